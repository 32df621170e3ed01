"""Pure image work shared by the gateway and the training code: no gRPC, no Triton."""

import os

from services.imaging.limits import DEFAULT_MAX_PIXELS

# OpenCV reads this once, at `import cv2`: without it a tiny PNG declaring 30000x30000 is decoded.
# Our own header checks (ingest/) enforce IngestLimits; this is the backstop inside OpenCV.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))

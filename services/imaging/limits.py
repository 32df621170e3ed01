"""Resource limits of image ingest, each with its unit in its name."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024

# Also the default of OPENCV_IO_MAX_IMAGE_PIXELS (set in services/imaging/__init__.py).
DEFAULT_MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class IngestLimits:
    """What one decode may consume; every check runs before the pixels are decoded.

    ``max_pixels`` counts every frame or slice of the object (rows * columns * frames), because
    the encoded object is held in memory whole even when one frame is rendered.
    """

    max_input_bytes: int = 64 * MIB  # the bytes a caller sends
    max_inflated_bytes: int = 256 * MIB  # a Deflated DICOM data set or a gzip wrapper, inflated
    max_pixels: int = DEFAULT_MAX_PIXELS  # rows * columns * frames (or slices) of the whole object
    max_frames: int = 2_000  # frames of a multi-frame DICOM, slices (x volumes) of NIfTI/MHA/NRRD
    max_dimension_pixels: int = 32_768  # rows or columns
    max_decoded_bytes: int = 1024 * MIB  # what the decoder allocates: one DICOM frame, a whole volume
    max_volume_read_seconds: int = 60  # SimpleITK's child process is killed after this long

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"IngestLimits.{name} must be a positive integer, got {value!r}")

"""The SimpleITK reader, run as its own process by :mod:`services.imaging.ingest.volume`.

Fuzzed NIfTI headers made ITK 5.4 corrupt the heap ("double free"); in the gateway that would
take every in-flight request down, so ITK only ever runs here. The protocol, one JSON line each:

1. ``python -I volume_child.py PATH IMAGE_IO OUT.npy`` prints the header
   (``size`` in ITK's x, y, z... order, ``components``, ``pixel_type``, ``spacing`` in mm) or
   ``{"error": "header"}``;
2. the parent checks its limits and writes ``read INDEX`` (or anything else to stop);
3. the child reads the image, saves slice INDEX along the third axis to OUT.npy and prints
   ``{"saved": true}``, or ``{"error": "pixels"}``.

Only NumPy and SimpleITK are imported: this file runs by path, without the package's imports.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

import numpy as np
import SimpleITK as sitk


def _say(stdout: IO[str], message: dict[str, Any]) -> None:
    stdout.write(json.dumps(message) + "\n")
    stdout.flush()


def main(argv: list[str], stdin: IO[str] = sys.stdin, stdout: IO[str] = sys.stdout) -> int:
    path, io_name, out = argv
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io_name)
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        _say(stdout, {"error": "header"})
        return 0
    size = [int(n) for n in reader.GetSize()]
    header = {
        "size": size,
        "components": int(reader.GetNumberOfComponents()),
        "pixel_type": sitk.GetPixelIDValueAsString(reader.GetPixelID()),
        "spacing": [float(s) for s in reader.GetSpacing()],
    }
    _say(stdout, header)
    command = stdin.readline().split()
    if len(command) != 2 or command[0] != "read" or not command[1].isdigit():
        return 0
    try:
        image = reader.Execute()  # whole image: ITK's streamed slice read of vector NIfTI corrupts the heap
    except RuntimeError:
        _say(stdout, {"error": "pixels"})
        return 0
    view = sitk.GetArrayViewFromImage(image)  # axes: [..., z, y, x] (+ components)
    for _ in range(len(size) - 3):
        view = view[0]  # a 4-D series: its first volume
    np.save(out, np.array(view[int(command[1])] if len(size) >= 3 else view), allow_pickle=False)
    _say(stdout, {"saved": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

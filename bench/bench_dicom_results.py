"""SEG and SR build time per image (``python -m bench.bench_dicom_results``): pydicom-data's RG1_UNCI.dcm.

What the gateway does on its executor when ``output.dicom_results`` is asked, without Triton: the
masks of three prompts (left lung, right lung, heart; drawn in the 1024 model square like the text
segmenter's) mapped back onto the 1841x1955 grid, a classification and three detections; then the
source header re-read, the BINARY SEG (three segments) and the TID 1500 SR. Stages are timed
separately and together, after warm-up calls (the first one loads highdicom's standard tables).
A benchmark, not a test; numbers from a shared 2-core machine are ratios, not capacity.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import cv2
import numpy as np

from services.dicom.results import (
    AIResults,
    Algorithm,
    Classification,
    Detection,
    Detections,
    Device,
    Segment,
    build_dicom_results,
    build_seg,
    build_sr,
    read_source,
)
from services.imaging.limits import IngestLimits
from services.imaging.prepare import prepare
from services.settings import PROJECT_ROOT
from tests.fixtures import pydicom_data_file

LIMITS = IngestLimits()


def model_masks() -> np.ndarray:
    """Lung- and heart-like masks in the 1024 model square (ellipses, as large as the real ones)."""
    masks = np.zeros((3, 1024, 1024), np.uint8)
    cv2.ellipse(masks[0], (690, 470), (150, 300), 0, 0, 360, (1,), -1)  # patient's left lung: image right
    cv2.ellipse(masks[1], (330, 470), (150, 300), 0, 0, 360, (1,), -1)
    cv2.ellipse(masks[2], (560, 640), (140, 120), 0, 0, 360, (1,), -1)
    return masks


def results_for(original: np.ndarray, width: int, height: int) -> AIResults:
    text = Algorithm("segmenter_text", "1")
    boxes = [(0.2, 0.3, 0.3, 0.4), (0.6, 0.5, 0.68, 0.6), (0.4, 0.2, 0.45, 0.26)]
    return AIResults(
        classification=Classification("lesion", 0.91, Algorithm("classifier", "1")),
        detections=Detections(
            [Detection((x0 * width, y0 * height, x1 * width, y1 * height), "lesion", 0.8) for x0, y0, x1, y1 in boxes],
            Algorithm("detector", "1"),
        ),
        segments=[
            Segment("left lung", "lung", 0.97, text, "left lung"),
            Segment("right lung", "lung", 0.96, text, "right lung"),
            Segment("heart", "heart anatomies", 0.95, text, "heart"),
        ],
        masks=original,
    )


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 2),
        "min_ms": round(ordered[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "dicom_results.json")
    args = parser.parse_args()

    data = pydicom_data_file("RG1_UNCI.dcm").read_bytes()
    prepared = prepare(data, limits=LIMITS)
    transform = prepared.transform
    masks = model_masks()
    results = results_for(
        transform.mask_to_original(masks), transform.original_width, transform.original_height
    )
    device = Device.for_algorithms(results.algorithms())
    stages: dict[str, list[float]] = {"mask_to_original": [], "read_source": [], "seg": [], "sr": [], "total": []}
    sizes: dict[str, int] = {}
    for run in range(args.warmup + args.runs):
        started = time.perf_counter()
        original = transform.mask_to_original(masks)
        mapped = time.perf_counter()
        source = read_source(data, frame=0, limits=LIMITS)
        read = time.perf_counter()
        seg, seg_dataset = build_seg(source, results.segments, original, device=device)
        built_seg = time.perf_counter()
        sr = build_sr(source, results, device=device, seg=seg_dataset)
        done = time.perf_counter()
        whole_started = time.perf_counter()
        build_dicom_results(data, frame=0, results=results, limits=LIMITS)  # the public call, end to end
        whole = time.perf_counter() - whole_started + (mapped - started)
        if run < args.warmup:
            continue
        stages["mask_to_original"].append((mapped - started) * 1000)
        stages["read_source"].append((read - mapped) * 1000)
        stages["seg"].append((built_seg - read) * 1000)
        stages["sr"].append((done - built_seg) * 1000)
        stages["total"].append(whole * 1000)
        sizes = {"seg_bytes": len(seg.data), "sr_bytes": len(sr.data)}
    report = {
        "image": "RG1_UNCI.dcm",
        "grid": f"{transform.original_width}x{transform.original_height}",
        "segments": len(results.segments),
        "detections": 3,
        "runs": args.runs,
        "stages": {name: summary(values) for name, values in stages.items()},
        **sizes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

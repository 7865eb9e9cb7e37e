"""chaiNNer's Convert To ONNX (and the first step of Convert To NCNN) on every variant, both
checkpoint forms and every opset chaiNNer offers, with chaiNNer's exact calls (tests/chainner.py).

    .venv/bin/python bench/chainner_conversion.py [--variants nano,tiny,xs,s,m,l,xl] [--scale 2]

Prints one row per conversion: export time, the scale strict shape inference reads back,
onnxruntime's largest difference from the exported (plain) network and the limit it is held to
(1e-4, or 4x torch's own float32 rounding where deep random networks reach outputs in the
hundreds), its largest difference from what chaiNNer's PyTorch node returns (the optimized
network), and whether chaiNNer's own "Verify" check (allclose, rtol 1e-2, atol 1e-3) passes.
m, l and xl take minutes: the test suite runs nano to s, this runs the rest.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chainner import (  # noqa: E402
    OPSETS,
    chainner_verifies,
    convert_to_onnx,
    float32_rounding,
    largest_difference,
    load_model,
    scale_by_shape_inference,
)

from helpers import randomized_model  # noqa: E402
from paragonsr import VARIANTS, config_for_variant, fuse_for_release  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, TorchScript exporter, seeded models x{args.scale}")
    print(
        "| variant | form | opset | export s | scale read | vs plain | limit | vs node "
        "| chaiNNer verify | verdict |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    passed = total = 0
    for variant in args.variants.split(","):
        for form in ("training", "fused"):
            model = randomized_model(config_for_variant(variant, args.scale))
            if form == "fused":
                fuse_for_release(model)
            for opset in OPSETS:
                descriptor = load_model(model.state_dict())
                start = time.perf_counter()
                try:
                    data = convert_to_onnx(descriptor, opset)
                    seconds = time.perf_counter() - start
                    scale = scale_by_shape_inference(data)
                    plain, served = largest_difference(data, descriptor)
                    verified = chainner_verifies(data, descriptor)
                except Exception as error:  # a row, not a traceback: the table is the report
                    cells = " | ".join([variant, form, str(opset)] + ["-"] * 6)
                    print(f"| {cells} | FAILED: {error} |")
                    total += 1
                    continue
                limit = max(1e-4, 4 * float32_rounding(model))
                ok = scale == args.scale and plain < limit and verified
                passed += ok
                total += 1
                print(
                    f"| {variant} | {form} | {opset} | {seconds:.1f} | x{scale} | "
                    f"{plain:.2g} | {limit:.2g} | {served:.2g} | "
                    f"{'passes' if verified else 'fails'} | {'ok' if ok else 'FAILED'} |",
                    flush=True,
                )
    print(f"\n{passed} of {total} conversions exported, read x{args.scale} and verified")


if __name__ == "__main__":
    main()

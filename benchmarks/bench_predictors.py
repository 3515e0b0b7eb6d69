"""Predictor latency and throughput per backend, measured side by side in one run.

For each configuration (``tiny``: the test-sized ViT; ``vits``: ViT-S/14 DINOv2 + the
default head; ``vitb``: ViT-B/14 + the default head; random weights, which cost the same
as trained ones) the predictor is exported with the export-engines code path (fp32 ONNX,
mixed-precision fp16 ONNX) and timed on every backend present: torch eager (CPU, and
CUDA when present), ONNX Runtime CPU fp32 and fp16, ONNX Runtime CUDA fp32 / fp16 when
the CUDA execution provider is installed, and TensorRT fp32 / fp16 plans (built with the
export code, run with the runtime's native backend) when TensorRT and a GPU are present;
what is missing is listed as skipped with the reason.

Prints a GitHub-markdown table: batch-1 latency (median ms), images/s at each larger
batch, and each backend's batch-1 speed relative to torch eager on the same device.

    python benchmarks/bench_predictors.py [--configs tiny vits vitb] [--batches 1 4 16]
        [--repeats 5] [--threads 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {"tiny": True},
    "vits": {"backbone": "vit_small_patch14_dinov2"},
    "vitb": {"backbone": "vit_base_patch14_dinov2"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "vits", "vitb"], choices=sorted(CONFIGS))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch, ONNX Runtime, BLAS)")
    ap.add_argument("--task", default="normals", choices=["normals", "uv"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent))
    sys.path.insert(0, str(here))

    import numpy as np
    import onnxruntime as ort
    import torch
    from _timing import median_ms
    from p3dmm.export.onnx_export import convert_fp16, export_onnx
    from p3dmm.export.sources import ExportSource
    from p3dmm.training.networks import Predictor, PredictorConfig

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    import importlib.util

    have_trt = importlib.util.find_spec("tensorrt") is not None and cuda
    skipped = {} if have_trt else {"tensorrt": "TensorRT is not installed or there is no CUDA device"}
    if not cuda:
        skipped["torch cuda"] = "no CUDA device"
    if not ort_cuda:
        skipped["ort cuda"] = "onnxruntime has no CUDAExecutionProvider (CPU wheel)"

    def ort_session(path: Path, provider: str) -> Callable[[np.ndarray], Any]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
        if sess.get_providers()[0] != provider:
            raise RuntimeError(f"{provider} requested, {sess.get_providers()[0]} in use")
        return lambda x: sess.run(None, {"image": x})

    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_predictors."))
    for name in args.configs:
        spec = CONFIGS[name]
        cfg = PredictorConfig.tiny(args.task) if spec.get("tiny") else PredictorConfig(backbone=spec["backbone"], task=args.task)
        torch.manual_seed(0)
        model = Predictor(cfg).eval()
        model.set_fused_attn(False)
        n_params = sum(p.numel() for p in model.parameters())
        fp32, fp16 = tmp / f"{name}.onnx", tmp / f"{name}.fp16.onnx"
        src = ExportSource(module=model, task=args.task, outputs=cfg.output_names, path=Path(name), sha256="",
                           format="bench", normal_space="camera", uv_layout=None, flip_tta=False)  # fmt: skip
        print(f"[{name}] exporting ({n_params / 1e6:.1f} M parameters)", file=sys.stderr, flush=True)
        export_onnx(src, fp32)
        convert_fp16(fp32, fp16)
        eager_model = Predictor(PredictorConfig(**{**cfg.to_dict(), "fused_attn": True}))
        eager_model.load_state_dict(model.state_dict())
        eager_model.eval()

        def torch_runner(device: str) -> Callable[[np.ndarray], Any]:
            m = eager_model.to(device)

            def run(x: np.ndarray) -> Any:
                with torch.inference_mode():
                    out = m(torch.from_numpy(x).to(device))
                    return {k: v.cpu() for k, v in out.items()}

            return run

        backends: dict[str, tuple[Callable[[np.ndarray], Any], Callable[[], None] | None]] = {
            "torch eager cpu": (torch_runner("cpu"), None),
            "ort cpu fp32": (ort_session(fp32, "CPUExecutionProvider"), None),
            "ort cpu fp16": (ort_session(fp16, "CPUExecutionProvider"), None),
        }
        if cuda:
            backends["torch eager cuda"] = (torch_runner("cuda"), torch.cuda.synchronize)
        if ort_cuda:
            backends["ort cuda fp32"] = (ort_session(fp32, "CUDAExecutionProvider"), None)
            backends["ort cuda fp16"] = (ort_session(fp16, "CUDAExecutionProvider"), None)
        if have_trt:  # plans built with the export code, run with the runtime's native backend
            try:
                from p3dmm.export.onnx_export import onnx_io
                from p3dmm.export.tensorrt_build import BuildOptions, build_engine
                from p3dmm.runtime.backends import TensorRTBackend
                from p3dmm.runtime.manifest import Manifest, ModelEntry, sha256_file

                import onnx

                io = onnx_io(onnx.load(str(fp32)))
                hi = max(args.batches)
                for prec, src_onnx in (("fp32", fp32), ("fp16", fp16)):
                    plan = tmp / f"{name}.{prec}.plan"
                    record = build_engine(src_onnx, plan, io, BuildOptions(batch=(1, 1, hi), timing_cache=tmp / "timing.cache"))
                    entry = ModelEntry(name=plan.stem, file=plan.name, task=args.task, kind="tensorrt", precision=prec,
                                       inputs=io[0], outputs=io[1], sha256=sha256_file(plan), tensorrt=record)  # fmt: skip
                    trt_backend = TensorRTBackend(tmp, entry, Manifest(models=[entry]))
                    backends[f"tensorrt {prec}"] = (lambda x, b=trt_backend: b.infer({"image": x}), torch.cuda.synchronize)
            except Exception as e:  # noqa: BLE001 - report, keep the other rows
                skipped["tensorrt"] = f"{type(e).__name__}: {e}"
        rng = np.random.default_rng(0)
        for bname, (run, sync) in backends.items():
            row: dict[str, Any] = {"config": name, "backend": bname, "params_m": n_params / 1e6}
            for b in args.batches:
                x = rng.random((b, 3, 512, 512), dtype=np.float32)
                ms = median_ms(lambda: run(x), repeats=args.repeats, warmup=args.warmup, sync=sync)
                row[f"b{b}_ms"] = ms
                print(f"[{name}] {bname} batch {b}: {ms:.1f} ms ({1000 * b / ms:.2f} images/s)", file=sys.stderr, flush=True)
            rows.append(row)

    print(f"predictor timing, task {args.task}, {args.threads} CPU thread(s), median of {args.repeats} after "
          f"{args.warmup} warm-up; random weights; input (B, 3, 512, 512)\n")
    head = ["config", "backend", "batch 1 ms"] + [f"batch {b} img/s" for b in args.batches if b != 1] + ["vs torch eager (batch 1)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
    for r in rows:
        gpu_row = "cuda" in r["backend"] or r["backend"].startswith("tensorrt")
        ref_name = "torch eager cuda" if gpu_row else "torch eager cpu"
        ref = next((q for q in rows if q["config"] == r["config"] and q["backend"] == ref_name), None)
        b1 = r.get("b1_ms")
        cells = [r["config"], r["backend"], f"{b1:.1f}" if b1 else "-"]
        cells += [f"{1000 * b / r[f'b{b}_ms']:.2f}" for b in args.batches if b != 1]
        cells.append(f"{ref['b1_ms'] / b1:.2f}x" if ref and b1 and ref.get("b1_ms") else "-")
        print("| " + " | ".join(cells) + " |")
    print()
    for what, why in skipped.items():
        print(f"skipped {what}: {why}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "skipped": skipped, "threads": args.threads}, indent=1))


if __name__ == "__main__":
    main()

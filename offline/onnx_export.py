"""Export the graphs the service runs: the user encoder and the vector of a new item (SID ->
item vector, or SID + content -> item vector for a model with a content tower).

Input/output names and shapes are the bundle contract (docs/bundle.md). Each export is
checked with onnx.checker and run once in ONNX Runtime against PyTorch before returning.
"""

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from sidrec.model.content_tower import ContentTower, TowerVector
from sidrec.model.hstu import HSTU, UserEncoder
from sidrec.model.item_embedding import ItemEmbedding, SidContentToVector, SidToVector

OPSET = 17  # LayerNormalization is opset 17; ONNX Runtime 1.17+ runs it
PARITY_TOL = 1e-4


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of dynamo but is the one that
        # turns this small graph into plain, dynamic-shaped ONNX ops without a torch.export
        # round trip; silence its deprecation notice only.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    graph = onnx.load(str(path))
    _restore_unused_inputs(graph, args, input_names, dynamic_axes)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def _restore_unused_inputs(
    graph: onnx.ModelProto,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """Put back inputs the exporter pruned because the graph ignores them (query_time when
    use_time is off), so every bundle's graph has the same inputs and callers need no case."""
    present = {value.name for value in graph.graph.input}
    inputs = []
    for name, arg in zip(input_names, args, strict=True):
        if name in present:
            inputs.append(next(v for v in graph.graph.input if v.name == name))
            continue
        dims = [dynamic_axes.get(name, {}).get(i, size) for i, size in enumerate(arg.shape)]
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(arg.numpy().dtype)
        inputs.append(onnx.helper.make_tensor_value_info(name, elem_type, dims))
    del graph.graph.input[:]
    graph.graph.input.extend(inputs)


def _check_parity(
    path: Path, feeds: dict[str, np.ndarray], expected: np.ndarray, what: str
) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, feeds)
    diff = float(np.abs(got - expected).max())
    if not diff < PARITY_TOL:
        raise RuntimeError(f"{what}: ONNX Runtime differs from PyTorch by {diff:.2e}")


@torch.no_grad()
def export_user_encoder(hstu: HSTU, d: int, path: Path, max_len: int) -> None:
    """Write user_encoder.onnx: item_vectors [B, N, d] float32, timestamps [B, N] int64,
    mask [B, N] bool, query_time [B] int64 -> user_vectors [B, d]; B and N dynamic,
    1 <= N <= max_len <= hstu.padded_len."""
    if d != hstu.d:
        raise ValueError(f"d={d} but the model's item vectors are {hstu.d}-dimensional")
    if not 1 <= max_len <= hstu.padded_len:
        raise ValueError(f"max_len must be in [1, {hstu.padded_len}], got {max_len}")
    # A CPU copy, so the caller's model keeps its device and train/eval mode.
    encoder = UserEncoder(copy.deepcopy(hstu)).cpu().eval()
    # Example batch: two ragged rows, N below max_len so no size is baked in by accident.
    b, n = 2, min(max_len, 7)
    gen = torch.Generator().manual_seed(0)
    item_vectors = torch.randn(b, n, d, generator=gen)
    timestamps = torch.arange(n, dtype=torch.int64).repeat(b, 1) * 3600 + 1_000_000_000
    mask = torch.arange(n)[None, :] < torch.tensor([[n], [max(1, n - 3)]])
    query_time = timestamps.max(1).values + 60
    args = (item_vectors, timestamps, mask, query_time)
    names = ["item_vectors", "timestamps", "mask", "query_time"]
    _export(
        encoder,
        args,
        path,
        input_names=names,
        output_names=["user_vectors"],
        dynamic_axes={
            "item_vectors": {0: "batch", 1: "length"},
            "timestamps": {0: "batch", 1: "length"},
            "mask": {0: "batch", 1: "length"},
            "query_time": {0: "batch"},
            "user_vectors": {0: "batch"},
        },
    )
    feeds = {name: t.numpy() for name, t in zip(names, args, strict=True)}
    _check_parity(path, feeds, encoder(*args).numpy(), "user encoder")


@torch.no_grad()
def export_sid_to_vector(item_embedding: ItemEmbedding, path: Path) -> None:
    """Write sid_to_vector.onnx: codes [B, L + 1] int64 -> vectors [B, d] float32 (raw), the
    vector of an item without a trained id; B dynamic. A model with a content part
    (model/item_embedding.py) also reads content [B, C] float32."""
    if item_embedding.has_content_part:
        _export_sid_content_to_vector(item_embedding, path)
        return
    model = SidToVector(copy.deepcopy(item_embedding)).cpu().eval()
    # The id variant ignores the codes (every cold item gets the unknown row) and does not
    # know L, so the code width is left dynamic too; SID variants read the first L columns.
    width = item_embedding.sid_layers + 1
    k = max(item_embedding.codes_per_layer, 1)
    codes = torch.randint(k, (3, width), generator=torch.Generator().manual_seed(0))
    _export(
        model,
        (codes,),
        path,
        input_names=["codes"],
        output_names=["vectors"],
        dynamic_axes={"codes": {0: "batch", 1: "width"}, "vectors": {0: "batch"}},
    )
    _check_parity(path, {"codes": codes.numpy()}, model(codes).numpy(), "SID -> vector")


def _export_sid_content_to_vector(item_embedding: ItemEmbedding, path: Path) -> None:
    model = SidContentToVector(copy.deepcopy(item_embedding)).cpu().eval()
    content_dim = item_embedding.content_dim
    _export_codes_and_content(model, item_embedding.codes_per_layer, item_embedding.sid_layers,
                              content_dim, path, "SID + content part")  # fmt: skip


@torch.no_grad()
def export_item_vector(tower: ContentTower, path: Path) -> None:
    """Write item_vector.onnx: codes [B, L + 1] int64 and content [B, C] float32 -> vectors
    [B, d] float32 (raw), a new item's vector from its SID and content vector; B dynamic."""
    model = TowerVector(copy.deepcopy(tower)).cpu().eval()
    _export_codes_and_content(model, tower.prefix_child.shape[1], tower.sid_layers,
                              tower.content[0].in_features, path, "SID + content")  # fmt: skip


def _export_codes_and_content(
    model: torch.nn.Module, codes_per_layer: int, sid_layers: int, content_dim: int, path: Path,
    what: str,
) -> None:  # fmt: skip
    # (codes [B, L + 1] int64, content [B, C] float32) -> vectors [B, d], B dynamic
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(codes_per_layer, (3, sid_layers + 1), generator=generator)
    content = torch.randn(3, content_dim, generator=generator)
    _export(
        model,
        (codes, content),
        path,
        input_names=["codes", "content"],
        output_names=["vectors"],
        dynamic_axes={"codes": {0: "batch"}, "content": {0: "batch"}, "vectors": {0: "batch"}},
    )
    feeds = {"codes": codes.numpy(), "content": content.numpy()}
    _check_parity(path, feeds, model(codes, content).numpy(), f"{what} -> vector")

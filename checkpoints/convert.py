"""Convert a Hugging Face Llama 4 checkpoint (config.json + safetensors) to the mavjax format.

    mavjax convert --hf DIR --out DIR [--dtype bfloat16|float32] [--overwrite]

The conversion streams: for each mavjax parameter it reads only the Hugging Face tensors that parameter is
built from (`checkpoints.hf_layout`), writes it, and frees them, so peak host memory stays near the size of
the largest parameter, not of the model. Everything the safetensors headers can tell (missing, unexpected or
mis-shaped tensors, unsupported dtypes, truncated files) is checked before anything is written. An
interrupted run leaves no manifest, so its output never looks complete; re-running it with the same
arguments resumes, skipping the parameters already written.

Tensors are read by parsing the safetensors header directly (8-byte little-endian header length, JSON header,
raw little-endian data) rather than with `safe_open(framework="numpy")`, which cannot return bfloat16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from checkpoints.hf_layout import Source, canonical_name, redundant_names, sources
from mavjax.checkpoint import CheckpointWriter, unpermuted_shape
from mavjax.config import ConfigError, Llama4Config
from mavjax.quantize import quantize_stored

OUT_DTYPES = ("bfloat16", "float32")

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


# FP8 releases store a Linear as `X.weight` (float8_e4m3fn [out, in]) beside `X.weight_scale`: [out, 1] per
# output channel (Meta's fbgemm_fp8 release, compressed-tensors "channel"), or [ceil(out/b), ceil(in/b)] per
# b x b block (DeepSeek-style "fp8" with weight_block_size). Such weights are dequantized while streaming;
# `--quantize fp8` then re-quantizes per output channel, which gives back the same codes and scales when the
# source was per-channel.
FP8_RELEASE_METHODS = ("fbgemm_fp8", "compressed-tensors", "fp8")


class ConversionError(ValueError):
    """A Hugging Face checkpoint that cannot be converted; the message names the tensor or file at fault."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in a safetensors file."""
    file: Path
    name: str  # as stored in the file
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    out_dir: Path
    written: int  # parameters written by this run
    already_present: int  # parameters found written by an earlier run (resume) or a finished checkpoint
    vision_skipped: int  # vision tensors in the source, not part of the text model
    already_done: bool  # out_dir held the finished checkpoint; nothing was written


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, without reading their data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ConversionError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    return {name: TensorEntry(path, name, h["dtype"], tuple(h["shape"]), 8 + n + h["data_offsets"][0],
                              8 + n + h["data_offsets"][1]) for name, h in header.items()}


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """One tensor's data, read into a fresh numpy array (bfloat16 and float8 as ml_dtypes types)."""
    out = np.empty(entry.shape, SAFETENSORS_DTYPES[entry.dtype])
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        if f.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
            raise ConversionError(f"tensor {entry.name!r} in {entry.file} is truncated")
    return out


def convert(hf_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16", progress: bool = True,
            overwrite: bool = False, quantize: str | None = None) -> ConversionSummary:
    """Convert the Hugging Face checkpoint in `hf_dir` to a mavjax checkpoint in `out_dir` (see module doc).
    A finished checkpoint already in `out_dir` is left as it is, unless `overwrite`. `quantize="fp8"` stores
    the projection weights as float8_e4m3fn with per-output-channel scales (`mavjax.quantize`)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if dtype not in OUT_DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(OUT_DTYPES)}, got {dtype!r}")
    if out_dir.resolve() == hf_dir.resolve():
        raise ConversionError(f"the output directory must not be the Hugging Face checkpoint's ({hf_dir})")
    cfg = _read_config(hf_dir)
    tensors, scales, vision_skipped = _scan(hf_dir)
    plan = sources(cfg, set(tensors))
    _check(plan, tensors, hf_dir, ignore=redundant_names(cfg))
    orphans = sorted(set(scales) - set(tensors))
    if orphans:
        raise ConversionError(f"unexpected tensor {scales[orphans[0]].name!r}: a weight scale without its weight")

    if quantize not in (None, "fp8"):
        raise ConversionError(f"quantize must be fp8 or absent, got {quantize!r}")
    writer = CheckpointWriter(out_dir, cfg, dtype, overwrite=overwrite, quant=quantize)
    if writer.complete:
        if progress:
            print(f"{out_dir} already holds this conversion; pass --overwrite to convert again")
        return ConversionSummary(out_dir, 0, len(plan), vision_skipped, already_done=True)
    bf16_layout = {t: unpermuted_shape(v, (writer.layout_of(t) or (None,))[0]) for t, v in writer.shapes.items()
                   if not t.endswith("_scale")}
    if {s.target: s.shape for s in plan} != bf16_layout:
        raise RuntimeError("checkpoints.hf_layout and mavjax.model disagree on the parameters of this config")
    todo = [s for s in plan if not writer.has(s.target)]
    kept: dict[str, np.ndarray] = {}  # tensors the next parameter also reads (a fused gate_up_proj)
    for i, src in enumerate(tqdm(todo, desc="convert", unit="param", disable=not progress)):
        arrays = [kept[n] if n in kept else _read_weight(tensors[n], scales.get(n)) for n in src.hf_names]
        following = set(todo[i + 1].hf_names) if i + 1 < len(todo) else set()
        kept = {n: a for n, a in zip(src.hf_names, arrays) if n in following}
        value = src.build(*arrays)
        del arrays  # free this parameter's tensors before reading the next one's
        layout = writer.layout_of(src.target)
        if layout is None:
            writer.write(src.target, value)
        else:  # FP8: quantize on the host in the stored layout, write the weight and its scale
            w8, scale = quantize_stored(value.astype(np.float32), *layout)
            if not writer.has(src.target + "_scale"):  # written before an interruption: the weight marks done
                writer.write(src.target + "_scale", np.asarray(scale))
            writer.write(src.target, np.asarray(w8))
    writer.finalize(tokenizer_src_dir=hf_dir)
    if progress:
        print(f"wrote {len(todo)} parameters to {out_dir} ({len(plan) - len(todo)} already there from an "
              f"earlier run; {vision_skipped} vision tensors skipped)")
    return ConversionSummary(out_dir, len(todo), len(plan) - len(todo), vision_skipped, already_done=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", metavar="DIR",
                        help="Hugging Face checkpoint directory (config.json and *.safetensors)")
    parser.add_argument("--out", metavar="DIR", help="mavjax checkpoint directory to write")
    parser.add_argument("--eagle3", nargs=2, metavar=("SRC", "DST"), default=None,
                        help="convert a public EAGLE-3 draft checkpoint instead (checkpoints/eagle3_layout.py)")
    parser.add_argument("--target", metavar="DIR", default=None,
                        help="with --eagle3: the mavjax target checkpoint the draft serves (its layer count)")
    parser.add_argument("--target-layers", type=int, default=None,
                        help="with --eagle3: the target's number of layers, if --target is not given")
    parser.add_argument("--aux-layers", default=None,
                        help="with --eagle3: target layers tapped, e.g. 1,23,44 (default: the draft's config)")
    parser.add_argument("--dtype", choices=OUT_DTYPES, default="bfloat16", help="parameter dtype (default bfloat16)")
    parser.add_argument("--overwrite", action="store_true", help="replace a mavjax checkpoint already in --out")
    parser.add_argument("--quantize", choices=("fp8",), default=None,
                        help="store attention/MLP/expert weights as FP8 with per-output-channel scales")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def main(args: argparse.Namespace) -> int:
    """`mavjax convert`. Errors are ValueError/FileNotFoundError subclasses naming the tensor or file at fault,
    which mavjax.cli reports without a traceback."""
    if args.eagle3:
        from checkpoints.eagle3_layout import convert_eagle3

        aux = [int(x) for x in args.aux_layers.split(",")] if args.aux_layers else None
        convert_eagle3(*args.eagle3, dtype=args.dtype, target_layers=args.target_layers, aux_layers=aux,
                       target_dir=args.target, overwrite=args.overwrite, progress=not args.quiet)
        return 0
    if not args.hf or not args.out:
        raise ConversionError("mavjax convert needs --hf DIR and --out DIR (or --eagle3 SRC DST)")
    convert(args.hf, args.out, dtype=args.dtype, progress=not args.quiet, overwrite=args.overwrite,
            quantize=args.quantize)
    return 0


def _read_config(hf_dir: Path) -> Llama4Config:
    try:
        cfg = Llama4Config.from_json(hf_dir)
    except ConfigError as e:
        raise ConfigError(f"{hf_dir / 'config.json'}: {e}") from None
    raw = json.loads((hf_dir / "config.json").read_text())
    qc = raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config")
    if qc is not None and qc.get("quant_method") not in FP8_RELEASE_METHODS:
        raise ConversionError(f"{hf_dir}: quantization method {qc.get('quant_method')!r} is not supported (FP8 "
                              f"releases with per-channel or block weight scales are: {FP8_RELEASE_METHODS})")
    return cfg


def _safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        for f in files:
            if not f.is_file():
                raise ConversionError(f"{index.name} lists {f.name}, which is not in {hf_dir}")
        return files
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"no *.safetensors files in {hf_dir}")
    return files


def _scan(hf_dir: Path) -> tuple[dict[str, TensorEntry], dict[str, TensorEntry], int]:
    """Text-model tensors by canonical name (multimodal prefixes stripped), their FP8 weight scales (by the
    weight's canonical name), and the number of vision tensors."""
    tensors: dict[str, TensorEntry] = {}
    scales: dict[str, TensorEntry] = {}
    vision = 0
    for file in _safetensors_files(hf_dir):
        # The headers, not the index's weight_map, say where each tensor is.
        for entry in read_header(file).values():
            name = canonical_name(entry.name)
            if name is None:
                vision += 1
            elif name.endswith(".weight_scale"):
                scales[name[:-len("_scale")]] = entry
            elif name.endswith(".input_scale") or name.endswith(".input_scale_ub"):
                continue  # static activation scales: activations are quantized dynamically here
            elif name in tensors:
                raise ConversionError(f"tensor {entry.name!r} is stored twice in {hf_dir} "
                                      f"({tensors[name].file.name}: {tensors[name].name!r}, {file.name})")
            else:
                tensors[name] = entry
    return tensors, scales, vision


def _read_weight(entry: TensorEntry, scale: TensorEntry | None) -> np.ndarray:
    """A tensor, dequantized to float32 if it is an FP8 weight with a scale."""
    w = read_tensor(entry)
    if scale is None:
        return w
    s = read_tensor(scale).astype(np.float32)
    out, inp = w.shape
    if s.size == out:  # per output channel
        return w.astype(np.float32) * s.reshape(out, 1)
    bo, bi = -(-out // s.shape[0]), -(-inp // s.shape[1])  # per block
    return w.astype(np.float32) * np.repeat(np.repeat(s, bo, 0), bi, 1)[:out, :inp]


def _check(plan: list[Source], tensors: dict[str, TensorEntry], hf_dir: Path, ignore: set[str]) -> None:
    expected = {n: shape for s in plan for n, shape in zip(s.hf_names, s.hf_shapes)}
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"missing tensor {missing[0]!r} in {hf_dir}{more}")
    unexpected = sorted(set(tensors) - set(expected) - ignore)
    if unexpected:
        e = tensors[unexpected[0]]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"unexpected tensor {e.name!r} in {e.file}{more}: not part of the Llama 4 text "
                              f"model that config.json describes")
    for name, shape in expected.items():
        e = tensors[name]
        if e.shape != shape:
            raise ConversionError(f"tensor {e.name!r} has shape {e.shape}, expected {shape} from config.json")
        if e.dtype not in SAFETENSORS_DTYPES:
            raise ConversionError(f"tensor {e.name!r} in {e.file} has unsupported dtype {e.dtype}")
        nbytes = math.prod(e.shape) * np.dtype(SAFETENSORS_DTYPES[e.dtype]).itemsize
        if e.end - e.start != nbytes or e.end > e.file.stat().st_size:
            raise ConversionError(f"tensor {e.name!r} in {e.file}: its byte range does not match its shape and "
                                  f"dtype, or runs past the end of the file (corrupt or truncated file?)")


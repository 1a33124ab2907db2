"""The mavjax checkpoint format: one orbax checkpoint per parameter, and a manifest written last.

    <dir>/config.json             `Llama4Config.to_dict()`
    <dir>/tokenizer.json ...      tokenizer files copied from the source, when it has them
    <dir>/params/<target>/        one orbax checkpoint {"value": array} per parameter, e.g. params/layers.3.attn.wq/
    <dir>/mavjax_manifest.json    format version, dtype, and every parameter's shape and dtype

Format version 2 stores the FP8 attention and dense-MLP weights output first, [*out, *in]
(`mavjax.model.stored_layout`); version 1 stored every weight [*in, *out]. Version 1 checkpoints still load: their
FP8 weights are transposed as they are read.

One checkpoint per parameter lets a conversion stream tensor by tensor and resume parameter by parameter.
A parameter is saved under params/.partial/ and renamed into place once orbax has finished it, so a directory
params/<target>/ is always whole. The manifest is written last, atomically: a directory without it is
incomplete and `load_model` refuses it. While a checkpoint is being written, `mavjax_pending.json` records
its config and dtype, so that a resumed run can check that it continues the same conversion.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mavjax.atomic_write import write_json
from mavjax.config import Llama4Config
from mavjax.model import Llama4, stored_layout

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "mavjax_manifest.json"
PENDING = "mavjax_pending.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json")


class CheckpointError(ValueError):
    """A mavjax checkpoint that is missing, incomplete, or not the one asked for."""


def param_shapes(cfg: Llama4Config, quant: str | None = None) -> dict[str, tuple[int, ...]]:
    """Every parameter of `Llama4(cfg, quant=quant)`, by dotted path ("layers.3.attn.wq"), with its shape.
    Nothing is allocated: the model is only traced."""
    return {t: shape for t, (shape, _, _) in param_specs(cfg, quant).items()}


def param_specs(cfg: Llama4Config, quant: str | None = None) -> dict[str, tuple[tuple[int, ...], object, tuple]]:
    """target -> (shape, fixed dtype or None, stored layout or None). FP8 weights are float8_e4m3fn and their
    scales float32 whatever the checkpoint's dtype; every other parameter is stored in the checkpoint's dtype.
    The layout of an FP8 weight is `mavjax.model.stored_layout`'s (perm, contract)."""
    model = nnx.eval_shape(lambda: Llama4(cfg, dtype=jnp.bfloat16, quant=quant))
    out = {}
    for path, var in _flat_params(model):
        v = var.get_value()
        fixed = v.dtype if v.dtype in (jnp.float8_e4m3fn, jnp.float32) else None
        out[_dotted(path)] = (tuple(v.shape), fixed, stored_layout(var))
    return out


class CheckpointWriter:
    """Writes a checkpoint parameter by parameter; opening an unfinished one again resumes it.

    `out_dir` must be new or empty, or hold a mavjax checkpoint (finished or not) of the same config and
    dtype; `overwrite=True` first deletes a mavjax checkpoint found there, whatever its config. `complete` is
    True when the directory already holds the finished checkpoint (then there is nothing to write)."""

    def __init__(self, out_dir: str | Path, cfg: Llama4Config, dtype, *, overwrite: bool = False,
                 quant: str | None = None):
        self.dir = Path(out_dir)
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.quant = quant
        self.specs = param_specs(cfg, quant)
        self.shapes = {t: shape for t, (shape, _, _) in self.specs.items()}
        self._params = self.dir / "params"
        self._partial = self._params / ".partial"
        pending = {"format_version": FORMAT_VERSION, "dtype": self.dtype.name, "quant": quant,
                   "config": cfg.to_dict()}
        found = _existing(self.dir)
        if found is not None and overwrite:
            write_json(self.dir / PENDING, pending)  # so the directory stays recognisably ours while cleared
            _clear(self.dir)
            found = None
        if found is not None:
            old_cfg, old_dtype, complete, old_quant, old_version = found
            diff = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(old_cfg, f.name)]
            if old_dtype != self.dtype:
                diff.append(f"dtype ({old_dtype.name} there, {self.dtype.name} asked)")
            if old_quant != quant:
                diff.append(f"quantization ({old_quant} there, {quant} asked)")
            elif quant is not None and old_version != FORMAT_VERSION:  # FP8 weights laid out otherwise there
                diff.append(f"format version ({old_version} there, {FORMAT_VERSION} written now)")
            if diff:
                state = "checkpoint" if complete else "unfinished checkpoint"
                raise CheckpointError(f"{self.dir} holds a mavjax {state} that differs in {', '.join(diff)}; "
                                      f"pass overwrite=True (--overwrite) to replace it, or write elsewhere")
        self.complete = found is not None and found[2]
        if self.complete:
            return
        shutil.rmtree(self._partial, ignore_errors=True)  # left by a write that was cut short
        self._partial.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / PENDING, pending)

    def has(self, target: str) -> bool:
        return (self._params / target).is_dir()

    def dtype_of(self, target: str):
        return self.specs[target][1] or self.dtype

    def layout_of(self, target: str):
        """(perm, contract) of a weight stored in FP8 - quantize jnp.transpose(w, perm) over its axes contract -
        else None."""
        return self.specs[target][2]

    def write(self, target: str, value) -> None:
        """Save one parameter (numpy or jax array, cast to its stored dtype: the checkpoint's, or float8 /
        float32 for FP8 weights and their scales)."""
        if target not in self.shapes:
            raise CheckpointError(f"{target!r} is not a parameter of this config")
        if tuple(value.shape) != self.shapes[target]:
            raise CheckpointError(f"{target}: got shape {tuple(value.shape)}, the config needs {self.shapes[target]}")
        if self.has(target):
            raise CheckpointError(f"{target} is already written in {self.dir}")
        save_array(self.dir, target, value.astype(self.dtype_of(target), copy=False))

    def finalize(self, tokenizer_src_dir: str | Path | None = None) -> None:
        """Write config.json and the tokenizer files, then the manifest that marks the checkpoint complete."""
        missing = [t for t in self.shapes if not self.has(t)]
        if missing:
            raise CheckpointError(f"cannot finalize {self.dir}: {len(missing)} parameter(s) not written, "
                                  f"e.g. {missing[0]!r}")
        write_json(self.dir / "config.json", self.cfg.to_dict())
        if tokenizer_src_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_src_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_src_dir) / name, self.dir / name)
        params = {t: {"shape": list(s), "dtype": jnp.dtype(self.dtype_of(t)).name} for t, s in self.shapes.items()}
        seal(self.dir, {"format": "mavjax", "format_version": FORMAT_VERSION, "dtype": self.dtype.name,
                        "quant": self.quant, "params": params})
        self.complete = True


def load_model(path: str | Path, *, dtype=None, shardings: dict | None = None, kernels: str = "xla"
               ) -> tuple[Llama4Config, Llama4]:
    """Load a mavjax checkpoint: (config, model). Each parameter is restored by orbax straight into its
    target array: on the default device, or with `shardings[target]` (a `jax.sharding.Sharding`) where given.
    `dtype=None` keeps the checkpoint's dtype; another dtype is cast to while reading."""
    path = Path(path)
    manifest = _read_manifest(path)
    cfg = Llama4Config.from_json(path / "config.json")
    dtype = jnp.dtype(manifest["dtype"] if dtype is None else dtype)
    quant = manifest.get("quant")
    model = nnx.eval_shape(lambda: Llama4(cfg, dtype=dtype, kernels=kernels, quant=quant))
    params = {_dotted(p): var for p, var in _flat_params(model)}
    stored, shardings = manifest["params"], dict(shardings or {})
    # version 1 stored every FP8 weight [*in, *out]: read those in that layout, then transpose (perm)
    old_perm = {t: lay[0] for t, var in params.items() if manifest["format_version"] == 1
                and (lay := stored_layout(var)) is not None and lay[0] != tuple(range(len(lay[0])))}
    for target, var in params.items():  # check everything before reading anything
        if target not in stored:
            raise CheckpointError(f"{path}: parameter {target!r} is missing from the checkpoint")
        if tuple(stored[target]["shape"]) != unpermuted_shape(var.get_value().shape, old_perm.get(target)):
            raise CheckpointError(f"{path}: parameter {target!r} has shape {tuple(stored[target]['shape'])}, "
                                  f"the model needs {unpermuted_shape(var.get_value().shape, old_perm.get(target))}")
    for what, names in (("parameter", stored), ("sharding given for", shardings)):
        unknown = sorted(set(names) - set(params))
        if unknown:
            raise CheckpointError(f"{path}: {what} {unknown[0]!r} is not a parameter of the model")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        for target, var in params.items():
            v = var.get_value()  # FP8 weights and their scales keep their own dtype
            sharding, perm = shardings.get(target, default), old_perm.get(target)
            if perm is None:
                want = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                var.set_value(ckptr.restore((path / "params" / target).absolute(), {"value": want})["value"])
                continue
            inv = tuple(int(i) for i in np.argsort(perm))  # stored axis j is the old layout's axis perm[j]
            old_sharding = (jax.sharding.NamedSharding(sharding.mesh, P(*(_spec_at(sharding.spec, i) for i in inv)))
                            if isinstance(sharding, jax.sharding.NamedSharding) else sharding)
            want = jax.ShapeDtypeStruct(unpermuted_shape(v.shape, perm), v.dtype, sharding=old_sharding)
            old = ckptr.restore((path / "params" / target).absolute(), {"value": want})["value"]
            var.set_value(jax.jit(functools.partial(jnp.transpose, axes=perm), out_shardings=sharding)(old))
    model.inv_freq.set_value(jnp.asarray(cfg.rope_inv_freq(), jnp.float32))  # derived from config, not saved
    abstract = [_dotted(p) for p, v in nnx.to_flat_state(nnx.state(model))
                if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if abstract:  # a model variable this format does not know how to fill
        raise CheckpointError(f"model state {abstract[0]!r} is neither a saved parameter nor derived by load_model")
    return cfg, model


def save_model(model: Llama4, out_dir: str | Path, tokenizer_src_dir: str | Path | None = None) -> None:
    """Write an in-memory model as a mavjax checkpoint in `model.dtype`, replacing a mavjax checkpoint that
    is already in `out_dir`."""
    writer = CheckpointWriter(out_dir, model.cfg, model.dtype, overwrite=True, quant=model.quant)
    for path, var in _flat_params(model):
        writer.write(_dotted(path), var.get_value())
    writer.finalize(tokenizer_src_dir)


def unpermuted_shape(shape, perm):
    """The shape that jnp.transpose(., perm) turns into `shape` (`shape` itself for perm None): an FP8 weight's
    bf16 layout (perm its stored_layout's), as a version-1 checkpoint stores it."""
    return tuple(shape) if perm is None else tuple(shape[j] for j in np.argsort(perm))


def _spec_at(spec, i):
    return spec[i] if i < len(spec) else None


def _flat_params(model):
    return nnx.to_flat_state(nnx.state(model, nnx.Param))


def _dotted(path) -> str:
    return ".".join(str(k) for k in path)


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if not (path / MANIFEST).is_file():
        if not (path / PENDING).exists() and any(path.glob("*.safetensors")):
            raise CheckpointError(f"{path} is a Hugging Face checkpoint, not a mavjax one: convert it first with "
                                  f"`mavjax convert --hf {path} --out DIR`")
        raise CheckpointError(f"incomplete checkpoint {path}: no {MANIFEST} (conversion interrupted? re-run "
                              f"`mavjax convert` with the same arguments to resume)")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint format version {manifest.get('format_version')!r} is not "
                              f"supported (this mavjax reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    return manifest


def _existing(out_dir: Path):
    """What `out_dir` holds: None if nothing, else (config, dtype, complete, quant, format version) of the
    checkpoint there."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    if (out_dir / MANIFEST).is_file():
        m = _read_manifest(out_dir)
        return Llama4Config.from_json(out_dir), jnp.dtype(m["dtype"]), True, m.get("quant"), m["format_version"]
    if (out_dir / PENDING).is_file():
        pending = json.loads((out_dir / PENDING).read_text())
        return (Llama4Config.from_dict(pending["config"]), jnp.dtype(pending["dtype"]), False, pending.get("quant"),
                pending.get("format_version"))
    raise CheckpointError(f"{out_dir} is not empty and holds no mavjax checkpoint; choose a new or empty directory")


def _clear(out_dir: Path) -> None:
    """Delete a checkpoint's files, except the pending marker. The manifest goes first, so that a directory
    whose deletion is cut short never looks complete."""
    for name in (MANIFEST, "config.json", *TOKENIZER_FILES):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / "params", ignore_errors=True)


def save_array(out_dir: Path, name: str, value) -> None:
    """One array as its own orbax item under out_dir/params: staged in params/.partial, then renamed into place,
    so an interrupted write never leaves an item that looks written (the writers' resume relies on it)."""
    params = Path(out_dir) / "params"
    tmp = params / ".partial" / name
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp.absolute(), {"value": value}, force=True)
        ckptr.wait_until_finished()
    os.replace(tmp, params / name)


def seal(out_dir: Path, manifest: dict) -> None:
    """Mark a checkpoint complete: drop the staging area, write the manifest (last: its presence means
    complete), then remove the pending marker."""
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir / "params" / ".partial", ignore_errors=True)
    write_json(out_dir / MANIFEST, manifest)
    (out_dir / PENDING).unlink(missing_ok=True)



"""Teacher-output cache: run the teacher once per dataset, reuse its outputs every epoch.

Online distillation runs the teacher's forward pass on every batch of every
epoch. When the training inputs are the same every epoch (torchslim keeps a
split as one transformed tensor), the teacher's outputs are too, so they can be
computed once and looked up by sample index.

A cache is keyed by a SHA-256 *fingerprint* of everything its contents depend
on: the teacher's architecture (``str(teacher)``) and every tensor of its state
dict, the input tensor itself (so the dataset, its split and every transform
already applied to it), the teacher layers stored, the storage format and the
cache version. A cache is only ever used after its fingerprint has been
recomputed and compared, so a changed teacher or changed data never reads a
stale cache. A split that declares a random transform (a non-None ``transform``
or ``augment`` attribute) cannot be cached: its inputs differ every epoch.

Storage (``DistillConfig.cache_format``):

- ``fp32``: the logits exactly as the teacher computed them;
- ``fp16``: logits shifted per sample so the largest is 0, in half precision
  (softmax at any temperature ignores the shift), 2 bytes per class;
- ``topk``: the ``k`` largest shifted logits (fp16) and their class indices, plus
  one fp16 value per sample given to every other class, chosen so that the other
  classes keep their total probability at T = 1 (``logsumexp(rest) − log(K − k)``).

Feature maps (for hints and attention transfer) are stored in fp16 (fp32 with
``fp32``). On disk a cache is one safetensors file written atomically, named by
its fingerprint, with a JSON header under the metadata key ``torchslim_cache``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from torchslim.atomic import atomic_write_with
from torchslim.distill.features import FeatureHooks
from torchslim.distill.frozen import ModuleState
from torchslim.errors import ConfigError, DataError, ModelError

CACHE_VERSION = 1
HEADER_KEY = "torchslim_cache"
FEATURE_PREFIX = "feature:"
FORMATS = ("fp16", "fp32", "topk")


def _hash_tensor(h: "hashlib._Hash", name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy for CPU tensors


def fingerprint(teacher: nn.Module, inputs: torch.Tensor, *, layers: Iterable[str] = (),
                cache_format: str = "fp16", top_k: int = 5) -> str:
    """SHA-256 (hex) of what the cached outputs depend on; see the module docstring.

    Args:
        teacher: the teacher (architecture and every state-dict tensor, buffers included).
        inputs: ``(N, ...)`` the exact tensor the teacher is run on.
        layers: teacher layers whose features are cached.
        cache_format: ``fp16``, ``fp32`` or ``topk``.
        top_k: logits kept per sample (only part of the key with ``topk``).
    """
    h = hashlib.sha256()
    h.update(f"torchslim-teacher-cache|v{CACHE_VERSION}|{cache_format}|"
             f"{top_k if cache_format == 'topk' else ''}|{json.dumps(list(layers))}|".encode())
    h.update(f"{type(teacher).__module__}.{type(teacher).__qualname__}|{teacher}|".encode())
    for name, tensor in teacher.state_dict().items():
        _hash_tensor(h, "teacher." + name, tensor)
    _hash_tensor(h, "inputs", inputs)
    return h.hexdigest()


def not_cacheable_reason(split: Any, train_config: Any = None) -> str | None:
    """Why the teacher's outputs on ``split`` cannot be cached, or None when they can.

    They cannot when the inputs may differ from epoch to epoch: the split (or the
    training config) declares a transform or augmentation, or ``split.x`` is not a
    plain tensor (something computed when indexed).
    """
    for owner, label in ((split, "the training split"), (train_config, "the training config")):
        for attr in ("augment", "augmentation", "transform", "transforms"):
            value = getattr(owner, attr, None) if owner is not None else None
            if value not in (None, False):
                return (f"{label} applies {attr}={value!r}: with random augmentation the inputs differ every "
                        "epoch, so cached teacher outputs would not match them")
    if not isinstance(getattr(split, "x", None), torch.Tensor):
        return (f"the training split's inputs are a {type(getattr(split, 'x', None)).__name__}, not a tensor: "
                "torchslim cannot tell that they are the same every epoch")
    return None


class TeacherCache:
    """A teacher's outputs for every sample of one input tensor, looked up by sample index.

    Build one with :meth:`build` (or :func:`cache_teacher_outputs`, which also keeps it
    on disk); read it with :meth:`lookup`.

    Attributes:
        fingerprint: what the contents depend on (see :func:`fingerprint`).
        cache_format: ``fp16``, ``fp32`` or ``topk``.
        top_k: logits kept per sample with ``topk``.
        num_samples: N.
        num_classes: K.
        layers: teacher layers whose feature maps are stored.
        tensors: the stored tensors (``logits``, or ``topk_values``/``topk_indices``/``rest``;
            ``feature:<layer>`` per layer).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], *, fingerprint: str, cache_format: str, top_k: int,
                 num_samples: int, num_classes: int, layers: tuple[str, ...]):
        if cache_format not in FORMATS:
            raise ConfigError(f"cache_format must be one of {', '.join(FORMATS)}, got {cache_format!r}")
        self.tensors = tensors
        self.fingerprint = fingerprint
        self.cache_format = cache_format
        self.top_k = top_k
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.layers = tuple(layers)

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, teacher: nn.Module, inputs: torch.Tensor, *, layers: Iterable[str] = (),
              cache_format: str = "fp16", top_k: int = 5, batch_size: int | None = None,
              device: str | torch.device | None = None) -> "TeacherCache":
        """Run ``teacher`` (in eval mode, no gradients) over ``inputs`` once and store its outputs.

        Args:
            teacher: the teacher; left in eval mode.
            inputs: ``(N, ...)`` training inputs, in the order the indices refer to.
            layers: teacher layers whose outputs are stored too (for hints/attention).
            cache_format: ``fp16``, ``fp32`` or ``topk`` (see the module docstring).
            top_k: logits kept per sample with ``topk`` (fewer than the classes).
            batch_size: samples per teacher forward pass (default 256 on a CPU, where larger
                batches fall out of the processor's caches and run slower, 1024 on a GPU).
            device: where the teacher runs (default: where its parameters are).

        Raises:
            ModelError: the teacher's outputs are not ``(N, K)`` logits, contain NaN/Inf,
                or features overflow fp16.
            ConfigError: ``top_k`` is not smaller than the number of classes.
        """
        layers = tuple(dict.fromkeys(layers))
        digest = fingerprint(teacher, inputs, layers=layers, cache_format=cache_format, top_k=top_k)
        return cls._build(teacher, inputs, digest, layers, cache_format, top_k, batch_size, device)

    @classmethod
    @torch.no_grad()
    def _build(cls, teacher: nn.Module, inputs: torch.Tensor, digest: str, layers: tuple[str, ...],
               cache_format: str, top_k: int, batch_size: int | None,
               device: str | torch.device | None) -> "TeacherCache":
        if cache_format not in FORMATS:
            raise ConfigError(f"cache_format must be one of {', '.join(FORMATS)}, got {cache_format!r}")
        if device is None:
            device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        if batch_size is None:
            batch_size = 256 if torch.device(device).type == "cpu" else 1024
        # Eval mode while the outputs are computed, and back to the caller's modes after.
        state = ModuleState(teacher)
        teacher.eval()
        hooks = FeatureHooks(teacher, (), "teacher")
        n = inputs.shape[0]
        feature_dtype = torch.float32 if cache_format == "fp32" else torch.float16
        out: dict[str, torch.Tensor] = {}
        num_classes = 0
        try:
            hooks = FeatureHooks(teacher, layers, "teacher")
            for start in range(0, n, batch_size):
                logits = teacher(inputs[start:start + batch_size].to(device))
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise ModelError(f"the teacher must return (batch, classes) logits, got "
                                     f"{getattr(logits, 'shape', type(logits).__name__)}")
                logits = logits.float()
                num_classes = logits.shape[1]
                if not torch.isfinite(logits).all():
                    raise ModelError(f"the teacher's outputs contain NaN or Inf (samples {start}.."
                                     f"{start + len(logits) - 1}); check its weights and the inputs")
                rows = slice(start, start + len(logits))
                for key, value in cls._encode_logits(logits, cache_format, top_k).items():
                    if key not in out:
                        out[key] = torch.empty((n, *value.shape[1:]), dtype=value.dtype)
                    out[key][rows] = value.cpu()
                for name in layers:
                    feature = hooks.take(name).detach()
                    stored = feature.to(feature_dtype)
                    if not torch.isfinite(stored).all():
                        raise ModelError(f"teacher layer {name!r} gives values that are NaN/Inf or beyond the fp16 "
                                         "range; use cache_format 'fp32'")
                    key = FEATURE_PREFIX + name
                    if key not in out:
                        out[key] = torch.empty((n, *stored.shape[1:]), dtype=feature_dtype)
                    out[key][rows] = stored.cpu()
                hooks.clear()
        finally:
            hooks.remove()
            state.restore()
        return cls(out, fingerprint=digest, cache_format=cache_format, top_k=top_k, num_samples=n,
                   num_classes=num_classes, layers=layers)

    @staticmethod
    def _encode_logits(logits: torch.Tensor, cache_format: str, top_k: int) -> dict[str, torch.Tensor]:
        if cache_format == "fp32":
            return {"logits": logits}
        shifted = logits - logits.max(dim=1, keepdim=True).values
        if cache_format == "fp16":
            return {"logits": shifted.half()}
        k_classes = logits.shape[1]
        if not 1 <= top_k < k_classes:
            raise ConfigError(f"cache_top_k ({top_k}) must be smaller than the number of classes ({k_classes}); "
                              "use cache_format 'fp16' for so few classes")
        values, indices = shifted.topk(top_k, dim=1)
        rest = shifted.scatter(1, indices, float("-inf"))
        rest_value = torch.logsumexp(rest, dim=1) - math.log(k_classes - top_k)
        index_dtype = torch.int16 if k_classes <= torch.iinfo(torch.int16).max else torch.int32
        return {"topk_values": values.half(), "topk_indices": indices.to(index_dtype), "rest": rest_value.half()}

    # ------------------------------------------------------------------ reading
    def lookup(self, index: torch.Tensor, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """The teacher's outputs for the samples ``index``, as float32 on ``device``.

        Returns:
            ``{"logits": (B, K), <layer>: (B, ...) per stored layer}``. With ``fp16``/``topk``
            the logits are shifted per sample (largest = 0), which softmax ignores.
        """
        any_tensor = next(iter(self.tensors.values()))
        index = index.to(any_tensor.device)
        device = any_tensor.device if device is None else torch.device(device)
        if self.cache_format == "topk":
            values = self.tensors["topk_values"][index].float()
            logits = self.tensors["rest"][index].float()[:, None].repeat(1, self.num_classes)
            logits.scatter_(1, self.tensors["topk_indices"][index].long(), values)
        else:
            logits = self.tensors["logits"][index].float()
        out = {"logits": logits.to(device, non_blocking=True)}
        for name in self.layers:
            out[name] = self.tensors[FEATURE_PREFIX + name][index].to(device, non_blocking=True).float()
        return out

    def to(self, device: str | torch.device) -> "TeacherCache":
        """Move the stored tensors (e.g. onto the training GPU, so lookups stay there); returns self."""
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    @property
    def nbytes(self) -> int:
        """Bytes the stored tensors take."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def matches(self, teacher: nn.Module, inputs: torch.Tensor) -> bool:
        """True when this cache was built from exactly this teacher and these inputs (fingerprint recomputed)."""
        return self.fingerprint == fingerprint(teacher, inputs, layers=self.layers, cache_format=self.cache_format,
                                               top_k=self.top_k)

    # ------------------------------------------------------------------ files
    def header(self) -> dict[str, Any]:
        return {"format": "torchslim.teacher_cache", "version": CACHE_VERSION, "fingerprint": self.fingerprint,
                "cache_format": self.cache_format, "top_k": self.top_k, "num_samples": self.num_samples,
                "num_classes": self.num_classes, "layers": list(self.layers)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache as one safetensors file, atomically; returns the path."""
        path = Path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        metadata = {HEADER_KEY: json.dumps(self.header())}
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TeacherCache":
        """Read a file written by :meth:`save` (check :meth:`matches` before using it).

        Raises:
            DataError: the file is missing, not a cache file, or damaged.
        """
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = json.loads((fh.metadata() or {})[HEADER_KEY])
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            if header.get("format") != "torchslim.teacher_cache" or header.get("version") != CACHE_VERSION:
                raise ValueError(f"format {header.get('format')!r} version {header.get('version')!r}")
            cache = cls(tensors, fingerprint=header["fingerprint"], cache_format=header["cache_format"],
                        top_k=int(header["top_k"]), num_samples=int(header["num_samples"]),
                        num_classes=int(header["num_classes"]), layers=tuple(header["layers"]))
        except Exception as exc:  # any failure to read means: not a usable cache file
            raise DataError(f"{path}: not a readable torchslim teacher cache ({exc})") from None
        if any(t.shape[0] != cache.num_samples for t in tensors.values()):
            raise DataError(f"{path}: damaged teacher cache (tensor lengths disagree with the header)")
        return cache

    def __repr__(self) -> str:
        return (f"TeacherCache({self.num_samples} samples, {self.num_classes} classes, {self.cache_format}, "
                f"layers={list(self.layers)}, {self.nbytes / 1e6:.1f} MB, fingerprint={self.fingerprint[:12]})")


def cache_file_name(digest: str) -> str:
    """The file name a cache with fingerprint ``digest`` has inside a cache directory."""
    return f"teacher-outputs-{digest[:24]}.safetensors"


def cache_teacher_outputs(teacher: nn.Module, train: Any, *, layers: Iterable[str] = (), cache_format: str = "fp16",
                          top_k: int = 5, cache_dir: str | os.PathLike | None = None, batch_size: int | None = None,
                          device: str | torch.device | None = None, train_config: Any = None) -> TeacherCache:
    """The teacher's outputs on ``train.x``: read from ``cache_dir`` when a matching file is there, else computed.

    Args:
        teacher: the (frozen) teacher.
        train: the training split (``x`` tensor); refused if it declares a random transform.
        layers: teacher layers whose outputs are kept too (for hints/attention).
        cache_format: ``fp16``, ``fp32`` or ``topk``.
        top_k: logits per sample with ``topk``.
        cache_dir: directory of cache files (named by fingerprint; written atomically);
            None keeps the cache in memory only.
        batch_size: samples per teacher forward pass (default: 256 on a CPU, 1024 on a GPU).
        device: where the teacher runs.
        train_config: checked for an augmentation setting too.

    Raises:
        DataError: the inputs cannot be cached (random augmentation).

    Example:
        >>> import torch, torchslim as ts
        >>> from torchslim.data import TensorSplit
        >>> teacher = ts.models.create("lenet300_100", input_size=8, num_classes=4, hidden1=8, hidden2=8).eval()
        >>> split = TensorSplit(torch.randn(10, 1, 8, 8), torch.zeros(10, dtype=torch.long))
        >>> from torchslim.distill import cache_teacher_outputs
        >>> cache = cache_teacher_outputs(teacher, split, cache_format="fp32")
        >>> torch.equal(cache.lookup(torch.arange(10))["logits"], teacher(split.x))
        True
    """
    reason = not_cacheable_reason(train, train_config)
    if reason is not None:
        raise DataError(f"cannot cache the teacher's outputs: {reason}. Run the teacher online instead "
                        "(teacher_outputs: online, or auto, which does so here).")
    layers = tuple(dict.fromkeys(layers))
    path = None
    if cache_dir is not None:
        digest = fingerprint(teacher, train.x, layers=layers, cache_format=cache_format, top_k=top_k)
        path = Path(cache_dir) / cache_file_name(digest)
        if path.exists():
            try:
                cached = TeacherCache.load(path)
            except DataError as exc:
                warnings.warn(f"{exc}; computing the teacher's outputs again", stacklevel=2)
            else:
                if cached.fingerprint == digest:
                    return cached
    else:
        digest = fingerprint(teacher, train.x, layers=layers, cache_format=cache_format, top_k=top_k)
    cache = TeacherCache._build(teacher, train.x, digest, layers, cache_format, top_k, batch_size, device)
    if path is not None:
        cache.save(path)
    return cache

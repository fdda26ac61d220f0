"""Model weights as one flat float32 vector plus a spec, so every update transform is vector maths."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from fedlearn.errors import InvalidUpdateError, ModelError


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and dtypes of the floating-point state entries a flat vector carries, in order.

    Parameters and floating buffers travel; integer buffers (BatchNorm's step counter) stay local.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def from_module(cls, module: nn.Module, personal: Sequence[str] = ()) -> ParamSpec:
        """The spec of ``module``'s floating state, leaving out entries named by the ``personal`` patterns."""
        entries = [(n, t) for n, t in module.state_dict().items() if t.is_floating_point()
                   and not is_personal(n, personal)]
        return cls(
            names=tuple(n for n, _ in entries),
            shapes=tuple(tuple(t.shape) for _, t in entries),
            dtypes=tuple(str(t.dtype).removeprefix("torch.") for _, t in entries),
        )

    @property
    def numels(self) -> tuple[int, ...]:
        out = []
        for shape in self.shapes:
            n = 1
            for d in shape:
                n *= d
            out.append(n)
        return tuple(out)

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def fingerprint(self) -> str:
        """Short hash of the spec: two models can exchange vectors only if these match."""
        blob = json.dumps([self.names, self.shapes, self.dtypes]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "dtypes": list(self.dtypes)}

    @classmethod
    def from_dict(cls, data: dict) -> ParamSpec:
        return cls(tuple(data["names"]), tuple(tuple(s) for s in data["shapes"]), tuple(data["dtypes"]))

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector back into named tensors of the recorded shapes and dtypes."""
        check_vector(vector, self)
        out: dict[str, torch.Tensor] = {}
        for name, shape, dtype, piece in zip(self.names, self.shapes, self.dtypes, vector.split(self.numels)):
            out[name] = piece.reshape(shape).to(getattr(torch, dtype))
        return out


def is_personal(name: str, patterns: Sequence[str]) -> bool:
    """True when a state entry's name matches one of the personal-layer patterns (fnmatch, e.g. ``fc2.*``)."""
    return any(fnmatchcase(name, p) for p in patterns)


def check_vector(vector: torch.Tensor, spec: ParamSpec) -> None:
    """Refuse a vector that cannot be this model's weights or update (wrong rank or size)."""
    if vector.dim() != 1 or vector.numel() != spec.numel:
        raise InvalidUpdateError(
            f"update has shape {tuple(vector.shape)} but the model needs a flat vector of {spec.numel} values"
        )


class ModelVector:
    """Moves weights between one nn.Module and flat vectors without walking a state_dict per call.

    It keeps the module's floating state tensors in spec order. When they are all float32 on one device, they
    are re-pointed at slices of one contiguous buffer (the same Parameter objects, now views), so ``load`` is one
    copy into it, ``read`` one clone and ``delta`` one subtraction: a simulation reuses one model for all
    clients, and each client costs one pass over the weights instead of a gather and a scatter per tensor.
    Moving the module afterwards (``.to(...)``) is noticed and the entries are gathered into a new buffer.
    """

    def __init__(self, module: nn.Module, personal: Sequence[str] = ()) -> None:
        self.module = module
        self.spec = ParamSpec.from_module(module, personal)
        self._attach()

    def _share_storage(self, module: nn.Module) -> torch.Tensor | None:
        """One buffer holding every entry, the entries re-pointed at its slices; None when they cannot share one."""
        tensors = self._tensors
        if not tensors or any(t.dtype != torch.float32 or t.device != tensors[0].device for t in tensors):
            return None
        if len({id(t) for t in tensors}) != len(tensors):  # a tied weight appears twice: keep it as it is
            return None
        flat = torch.empty(self.spec.numel, dtype=torch.float32, device=tensors[0].device)
        owners = dict(module.named_modules())
        with torch.no_grad():
            for i, (name, piece) in enumerate(zip(self.spec.names, flat.split(self.spec.numels))):
                tensor = tensors[i]
                view = piece.view(tensor.shape)
                view.copy_(tensor)
                if isinstance(tensor, nn.Parameter):
                    tensor.data = view
                else:  # a floating buffer (BatchNorm's running statistics): the module holds the view instead
                    owner, _, leaf = name.rpartition(".")
                    owners[owner]._buffers[leaf] = view
                    tensors[i] = view
        return flat

    def _shared(self) -> torch.Tensor | None:
        """The shared buffer, rebuilt from the module when an entry has moved (``.to(...)``, a reassigned buffer)."""
        if (tuple(t.data_ptr() for t in self._tensors) != self._ptrs
                or any(slots.get(leaf) is not t for slots, leaf, t in self._buffers)):
            self._attach()
        return self._flat

    def _attach(self) -> None:
        state = self.module.state_dict(keep_vars=True)
        self._tensors = [state[name] for name in self.spec.names]
        self._flat = self._share_storage(self.module)
        self._ptrs = tuple(t.data_ptr() for t in self._tensors)
        owners = dict(self.module.named_modules())
        self._buffers = [(owners[name.rpartition(".")[0]]._buffers, name.rpartition(".")[2], t)
                         for name, t in zip(self.spec.names, self._tensors) if not isinstance(t, nn.Parameter)]

    def read(self) -> torch.Tensor:
        """The module's current weights as a new flat float32 vector on the CPU."""
        with torch.no_grad():
            flat = self._shared()
            if flat is not None:
                return flat.clone() if flat.device.type == "cpu" else flat.to("cpu")
            return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in self._tensors])

    def delta(self, weights: torch.Tensor) -> torch.Tensor:
        """The module's weights minus ``weights`` (a CPU float32 vector of the spec's size), as a new CPU vector."""
        with torch.no_grad():
            flat = self._shared()
            if flat is not None and flat.device.type == "cpu":
                return torch.sub(flat, weights)
            return self.read().sub_(weights)

    def read_grad(self) -> torch.Tensor:
        """Gradients in spec order as one flat vector; entries without a gradient give zeros."""
        self._shared()  # the module's current entries
        with torch.no_grad():
            return torch.cat(
                [
                    (t.grad if t.grad is not None else torch.zeros_like(t)).reshape(-1).to("cpu", torch.float32)
                    for t in self._tensors
                ]
            )

    def load(self, vector: torch.Tensor) -> None:
        """Copy a flat vector into the module's weights in place."""
        check_vector(vector, self.spec)
        with torch.no_grad():
            flat = self._shared()
            if flat is not None:
                flat.copy_(vector)
                return
            for tensor, piece in zip(self._tensors, vector.split(self.spec.numels)):  # entries as _shared found them
                tensor.copy_(piece.view(tensor.shape))


def flatten_module(module: nn.Module) -> torch.Tensor:
    """The module's floating state as one flat float32 vector."""
    return ModelVector(module).read()


def same_architecture(spec: ParamSpec, other: ParamSpec, what: str) -> None:
    """Refuse to federate models whose parameter layouts differ."""
    if spec != other:
        raise ModelError(
            f"{what} has a different architecture ({other.numel} values in {len(other.names)} tensors) "
            f"from the global model ({spec.numel} in {len(spec.names)}); give every client the same model class"
        )

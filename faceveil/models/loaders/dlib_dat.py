"""dlib's `dlib_face_recognition_resnet_model_v1.dat` as a PyTorch module that reproduces dlib's own output.

The file is dlib's binary serialisation of `anet_type` from dlib's dnn_face_recognition_ex.cpp: a ResNet
with 29 conv layers, `affine` layers (batch-norm frozen into a per-channel scale and shift), max-pool,
avg-pool and a 128-wide fc layer without bias, over `input_rgb_image_sized<150>`, which maps each channel to
(value - mean) / 256.

The format, as dlib writes it:
- integers: one control byte (low 4 bits = byte count, 0x80 = negative), then that many little-endian bytes;
- floating-point scalars: `float_details`, an integer mantissa then an integer exponent (m * 2**e);
- strings: an integer length, then the bytes; bools: one ASCII byte, b"1" or b"0";
- tensors: version 2, four 64-bit dims (n, k, nr, nc), then little-endian IEEE float32 values;
- the network is written recursively, outermost first: each wrapping layer writes its version, then its
  subnetwork, then its own details. So the stream holds every version number (output -> input), then the input
  layer, then the layers' details in FORWARD order. Tag and skip layers write a version and nothing else.

dlib's conventions reproduced here: a conv with stride != 1 has NO padding (a 3x3 stride-2 conv turns 8 -> 3
while the 2x2 avg-pool of the shortcut gives 4); `add_prev` adds tensors of different sizes by padding the
smaller one with zeros at the END of each axis (channels, rows, columns). The published file stores `affine_`
records (scale, shift) directly, so no batch-norm statistics need converting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceveil.errors import FaceveilError

SIDE = 150
DESCRIPTOR_SIZE = 128

# Residual units in forward order: (filters, downsamples). dlib's alevel4 .. alevel0.
UNITS: tuple[tuple[int, bool], ...] = (
    ((32, False),) * 3
    + ((64, True),) + ((64, False),) * 3
    + ((128, True),) + ((128, False),) * 2
    + ((256, True),) + ((256, False),) * 2
    + ((256, True),)
)


class DlibFormatError(FaceveilError):
    """The file is not the dlib face-recognition ResNet this loader knows."""


# ----------------------------------------------------------------------------------------------------
# Byte-level reader


class _Reader:
    """A cursor over dlib's serialisation primitives."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"dlib file truncated at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def integer(self) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8:
            raise DlibFormatError(f"bad integer control byte {control:#x} at byte {self.pos - 1}")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def real(self) -> float:
        mantissa, exponent = self.integer(), self.integer()
        specials = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        return specials[exponent] if exponent in specials else math.ldexp(mantissa, exponent)

    def string(self) -> str:
        return self.take(self.integer()).decode("latin-1")

    def boolean(self) -> bool:
        byte = self.take(1)
        if byte not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool {byte!r} at byte {self.pos - 1}")
        return byte == b"1"

    def version(self, *allowed: int) -> int:
        at, value = self.pos, self.integer()
        if value not in allowed:
            raise DlibFormatError(f"unexpected version {value} at byte {at} (expected one of {allowed})")
        return value

    def name(self, *allowed: str) -> str:
        at, value = self.pos, self.string()
        if value not in allowed:
            raise DlibFormatError(f"unexpected record {value!r} at byte {at} (expected one of {allowed})")
        return value

    def tensor(self) -> np.ndarray:
        self.version(2)
        shape = tuple(self.integer() for _ in range(4))
        count = int(np.prod(shape))
        return np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32).reshape(shape)

    def alias_tensor(self) -> tuple[int, ...]:
        self.version(1)
        return tuple(self.integer() for _ in range(4))


# ----------------------------------------------------------------------------------------------------
# The architecture as a flat list of layers, forward order


@dataclass(frozen=True)
class _Op:
    kind: str  # con | affine | relu | max_pool | avg_pool | add_prev | tag | skip | fc
    filters: int = 0  # con, fc
    kernel: int = 0  # con, pools (0 = the whole input)
    stride: int = 1


def _unit_ops(filters: int, down: bool) -> list[_Op]:
    """One `ares` / `ares_down` unit: tag1, block, (tag2, skip1, avg_pool), add_prev, relu."""
    stride = 2 if down else 1
    block = [_Op("con", filters, 3, stride), _Op("affine"), _Op("relu")]
    block += [_Op("con", filters, 3), _Op("affine")]
    shortcut = [_Op("tag"), _Op("skip"), _Op("avg_pool", kernel=2, stride=2)] if down else []
    return [_Op("tag"), *block, *shortcut, _Op("add_prev"), _Op("relu")]


def architecture() -> list[_Op]:
    """Every layer of `anet_type` from input to output (the input layer itself excluded)."""
    ops = [_Op("con", 32, 7, 2), _Op("affine"), _Op("relu"), _Op("max_pool", kernel=3, stride=2)]
    for filters, down in UNITS:
        ops += _unit_ops(filters, down)
    return [*ops, _Op("avg_pool", kernel=0, stride=1), _Op("fc", DESCRIPTOR_SIZE)]


# ----------------------------------------------------------------------------------------------------
# Layer records


@dataclass
class DlibNet:
    """What the file holds that matters for inference."""

    mean_rgb: tuple[float, float, float]
    convs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (weight OIHW, bias O)
    affines: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (scale C, shift C)
    fc: np.ndarray | None = None  # [in, out]: descriptor = features @ fc


def _read_con(r: _Reader, op: _Op) -> tuple[np.ndarray, np.ndarray]:
    version = r.name("con_4", "con_5")
    params = r.tensor().reshape(-1)
    num_filters, nr, nc, stride_y, stride_x, pad_y, pad_x = (r.integer() for _ in range(7))
    filters, _biases = r.alias_tensor(), r.alias_tensor()
    for _ in range(4):  # learning-rate and weight-decay multipliers
        r.real()
    use_bias = r.boolean() if version == "con_5" else True
    pad = op.kernel // 2 if op.stride == 1 else 0  # dlib's default: no padding when strided
    got = (num_filters, nr, nc, stride_y, stride_x, pad_y, pad_x)
    if got != (op.filters, op.kernel, op.kernel, op.stride, op.stride, pad, pad):
        raise DlibFormatError(f"conv layer {got} does not match the dlib face ResNet (expected {op})")
    n_weights = int(np.prod(filters))
    bias = params[n_weights:n_weights + num_filters] if use_bias else np.zeros(num_filters, np.float32)
    return params[:n_weights].reshape(filters).copy(), bias.copy()


def _read_affine(r: _Reader) -> tuple[np.ndarray, np.ndarray]:
    """An `affine_` record (the published file stores these, not `bn_con2`): per-channel gamma then beta."""
    version = r.name("affine_", "affine_2")
    params = r.tensor().reshape(-1)
    gamma_shape, _beta_shape = r.alias_tensor(), r.alias_tensor()
    r.integer()  # mode
    if version == "affine_2" and r.boolean():
        raise DlibFormatError("disabled affine layers are not supported")
    n = int(np.prod(gamma_shape))
    return params[:n].copy(), params[n:2 * n].copy()


def _read_pool(r: _Reader, op: _Op) -> None:
    name = "max_pool_2" if op.kind == "max_pool" else "avg_pool_2"
    r.name(name)
    got = tuple(r.integer() for _ in range(6))
    if got != (op.kernel, op.kernel, op.stride, op.stride, 0, 0):
        raise DlibFormatError(f"{name} {got} does not match the dlib face ResNet (expected {op})")


def _read_fc(r: _Reader, op: _Op) -> np.ndarray:
    version = r.name("fc_2", "fc_3")
    num_outputs, num_inputs = r.integer(), r.integer()
    params = r.tensor().reshape(-1)
    r.alias_tensor(), r.alias_tensor()  # weights [in, out], biases
    bias_mode = r.integer()
    for _ in range(4):
        r.real()
    if version == "fc_3":
        r.boolean()
    if num_outputs != op.filters or bias_mode != 1:  # dlib's FC_NO_BIAS == 1
        raise DlibFormatError(f"fc layer ({num_outputs} outputs, bias mode {bias_mode}) != fc_no_bias<128>")
    return params[:num_inputs * num_outputs].reshape(num_inputs, num_outputs).copy()


def _read_details(r: _Reader, op: _Op, net: DlibNet, expansion_factor: bool) -> None:
    """One layer's own record, then the add_layer bookkeeping that follows it."""
    if op.kind in ("tag", "skip"):
        return
    if op.kind == "con":
        net.convs.append(_read_con(r, op))
    elif op.kind == "affine":
        net.affines.append(_read_affine(r))
    elif op.kind in ("max_pool", "avg_pool"):
        _read_pool(r, op)
    elif op.kind == "fc":
        net.fc = _read_fc(r, op)
    else:
        r.name(f"{op.kind}_")
    _read_bookkeeping(r, expansion_factor)


def _read_bookkeeping(r: _Reader, expansion_factor: bool) -> None:
    """add_layer state after the details: 3 flags, x_grad, cached output, params (or final) gradient."""
    for _ in range(3):
        r.boolean()
    for _ in range(3):
        r.tensor()
    if expansion_factor:  # only the innermost add_layer, from its version 3
        r.integer()


def _read_input(r: _Reader) -> tuple[float, float, float]:
    r.name("input_rgb_image_sized")
    mean = (r.real(), r.real(), r.real())
    nr, nc = r.integer(), r.integer()
    if (nr, nc) != (SIDE, SIDE):
        raise DlibFormatError(f"input layer is {nr}x{nc}, expected {SIDE}x{SIDE}")
    return mean


def parse_dlib_resnet(data: bytes) -> DlibNet:
    """Parse the whole file into what inference needs, checking every record against `architecture()`."""
    r = _Reader(data)
    ops = architecture()
    r.version(1)
    r.name("loss_metric_", "loss_metric_2")
    for _ in range(2):  # margin, distance threshold: training-only
        r.real()
    for op in reversed(ops[1:]):
        r.version(1 if op.kind in ("tag", "skip") else 2)
    inner_version = r.version(2, 3)
    net = DlibNet(mean_rgb=_read_input(r))
    for i, op in enumerate(ops):
        _read_details(r, op, net, expansion_factor=i == 0 and inner_version >= 3)
    if r.pos != len(data):
        raise DlibFormatError(f"{len(data) - r.pos} unread bytes at the end of the dlib file")
    return net


# ----------------------------------------------------------------------------------------------------
# The PyTorch module


class Affine(nn.Module):
    """dlib's `affine` layer in conv mode: a per-channel scale and shift."""

    def __init__(self, scale: np.ndarray, shift: np.ndarray) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.from_numpy(scale.copy()).view(1, -1, 1, 1))
        self.shift = nn.Parameter(torch.from_numpy(shift.copy()).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _conv_affine(conv: tuple[np.ndarray, np.ndarray], affine: tuple[np.ndarray, np.ndarray], stride: int,
                 fold: bool) -> nn.Module:
    """A dlib `con` and the `affine` after it: one Conv2d with the affine folded in, or both, as dlib runs."""
    weight, bias = conv
    scale, shift = affine
    if fold:
        weight = weight * scale[:, None, None, None]
        bias = bias * scale + shift
    padding = weight.shape[-1] // 2 if stride == 1 else 0
    layer = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[-1], stride=stride, padding=padding)
    layer.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
    layer.bias.data.copy_(torch.from_numpy(np.ascontiguousarray(bias)))
    return layer if fold else nn.Sequential(layer, Affine(scale, shift))


def _pad_to(x: torch.Tensor, channels: int, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad at the END of the channel, row and column axes (dlib's add of unequal tensors)."""
    pads = (0, cols - x.shape[3], 0, rows - x.shape[2], 0, channels - x.shape[1])
    return F.pad(x, pads) if any(pads) else x


def add_unequal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's `tt::add(dest, a, b)` for tensors of different sizes: missing values count as 0."""
    if a.shape == b.shape:
        return a + b
    size = [max(i, j) for i, j in zip(a.shape[1:], b.shape[1:], strict=True)]
    return _pad_to(a, *size) + _pad_to(b, *size)


class ResidualUnit(nn.Module):
    """`ares` (identity shortcut) or `ares_down` (stride-2 block, 2x2 avg-pool shortcut), then relu."""

    def __init__(self, first: nn.Module, second: nn.Module, down: bool) -> None:
        super().__init__()
        self.first, self.second, self.down = first, second, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.second(F.relu(self.first(x)))
        if self.down:
            return F.relu(add_unequal(y, F.avg_pool2d(x, 2, 2)))
        return F.relu(y + x)


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet: [B, 3, 150, 150] float RGB 0..255 -> [B, 128] raw descriptors."""

    def __init__(self, net: DlibNet, fold: bool = True) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(net.mean_rgb, dtype=torch.float32).view(1, 3, 1, 1))
        convs, affines = net.convs, net.affines
        self.stem = _conv_affine(convs[0], affines[0], 2, fold)
        units = []
        for i, (_filters, down) in enumerate(UNITS):
            a, b = 1 + 2 * i, 2 + 2 * i
            first = _conv_affine(convs[a], affines[a], 2 if down else 1, fold)
            units.append(ResidualUnit(first, _conv_affine(convs[b], affines[b], 1, fold), down))
        self.units = nn.Sequential(*units)
        assert net.fc is not None
        self.fc = nn.Linear(net.fc.shape[0], net.fc.shape[1], bias=False)
        self.fc.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(net.fc.T)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / 256.0
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        x = self.units(x)
        return self.fc(x.mean(dim=(2, 3)))


def load_dlib_resnet(dat_path: str | Path, fold: bool = True, channels_last: bool = True) -> nn.Module:
    """Read dlib_face_recognition_resnet_model_v1.dat into an eval-mode module with frozen weights.

    `fold` folds each affine layer into the conv before it; `channels_last` stores the conv weights NHWC,
    which makes the convs run NHWC whatever the input layout (about 1.2-1.4x faster on CPU, forward and
    backward). Either way the output equals dlib's to float rounding; `fold=False, channels_last=False` runs
    dlib's own layer order.
    """
    path = Path(dat_path)
    if not path.is_file():
        raise DlibFormatError(f"missing dlib weight file {path}: run ./setup.sh (or `faceveil models fetch`)")
    model = DlibResNet(parse_dlib_resnet(path.read_bytes()), fold=fold)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)

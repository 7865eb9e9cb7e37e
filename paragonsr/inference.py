"""The inference network: ParagonSR with every fold applied, and the one definition of its passes.

:func:`optimize_for_inference` turns a :class:`~paragonsr.network.ParagonSR` (either form) into a
standalone, inference-only :class:`OptimizedParagonSR`. Per block:

- LayerScale ``gamma1`` moves into the context convolutions (output channel scaling) and, for the
  pass-through channels that have no convolution, into GroupNorm-1's affine;
- GroupNorm-2's affine moves into the two 1x1 input projections, which become one 1x1 convolution
  producing gate and value together;
- LayerScale ``gamma2`` moves into the 1x1 output projection;
- the FFN's three mixer branches are summed into one depthwise 3x3 kernel.

The tail ``conv 3x3 (nf -> nf*s^2) -> PixelShuffle(s) -> conv 3x3 (nf -> out)`` is linear, so it
collapses into one 5x5 convolution at low resolution (``nf -> out*s^2``) followed by PixelShuffle,
which never materializes the nf-channel high-resolution feature map. Composition is exact except
where ``conv_out``'s zero padding meets the image border: there the original pads the
*intermediate* map with zeros, whereas the composite would see its values extrapolated. The
outermost output row and column on each side are recomputed exactly from 2- or 3-pixel strips
of the input. Every fold is done in float64 and only then cast to the model's dtype.

**One definition.** :class:`InferenceBlock` writes a block's two passes once: ``context`` (the
residual plus LayerScale'd multi-scale context of a GroupNorm'd input) and ``ffn_delta``
(LayerScale'd gated FFN of a GroupNorm'd input); :class:`OptimizedParagonSR` adds ``head``,
``fuse`` and the collapsed ``tail``. Every inference path is built from these methods: the
whole-image forward here, the exact tiling streamer (:mod:`paragonsr.exact_tiling`, which feeds
them tiles normalized with whole-image statistics) and the ONNX export (this module with
:data:`GRAPH` numerics). What legitimately differs between those paths, and nothing else, lives
in :class:`Numerics`: how GroupNorm(1)'s statistics and Mish are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_threads import FreeCoreThreads
from .network import ParagonBlock, ParagonSR, not_a_plain_network
from .tiles import grid, run_tiled

# ----------------------------------------------------------------------------------------------
# The numeric forms of GroupNorm(1) and Mish, each written once.


_LOG2_E = 1.4426950408889634


def mish_(x: torch.Tensor) -> torch.Tensor:
    """Mish in five vectorized passes and one temporary, ``x`` left as it is:
    x * tanh(softplus(x)) equals x - 2x / ((e^x + 1)^2 + 1).

    ATen's CPU Mish runs 3-4x slower, and its exp 2.7x slower than exp2, so float32 forms e^x as
    2^(x log2 e): 8% of tiny x4's whole forward. Half-precision inputs keep exp, since x log2 e
    rounded to 8 or 11 bits would move e^x by several of their own units. Within 1.4e-6 of
    float64 Mish for |x| up to 1e4; e^x overflowing to inf gives x, vanishing gives 0.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        denominator = torch.exp(x)
    else:
        denominator = torch.mul(x, _LOG2_E).exp2_()
    denominator.add_(1)
    torch.addcmul(x.new_ones(()), denominator, denominator, out=denominator)
    return torch.addcdiv(x, x, denominator, value=-2.0, out=denominator)


class _Softsign(torch.autograd.Function):
    """z / (1 + |z|), exported as ONNX's one-pass Softsign (torch's softsign traces as three
    operators)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        return z / (z.abs() + 1)

    @staticmethod
    def symbolic(g, z):
        return g.op("Softsign", z)


class _HalfPlusOne(torch.autograd.Function):
    """z / 2 + 1 per element, exported as one BatchNormalization with constant statistics (mean
    0, variance 1, epsilon 0: exact): one pass where Mul and Add are two. The channel count
    comes as a number, so the constants are initializers rather than traced from a Shape."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, channels: int) -> torch.Tensor:
        return z * 0.5 + 1

    @staticmethod
    def symbolic(g, z, channels):
        dtype = torch.float16 if z.type().scalarType() == "Half" else torch.float32

        def constant(value: float):
            return g.op("Constant", value_t=torch.full((channels,), value, dtype=dtype))

        return g.op(
            "BatchNormalization",
            z,
            constant(0.5),
            constant(1.0),
            constant(0.0),
            constant(1.0),
            epsilon_f=0.0,
        )


def mish_graph(x: torch.Tensor) -> torch.Tensor:
    """Mish for graphs, in six elementwise operators: x * Softsign(z), z = e^x (e^x / 2 + 1),
    since tanh(softplus(x)) = t / (t + 2) with t = e^x (e^x + 2) and z = t / 2 >= 0.

    Each operator of an exported graph is one pass over memory: this form has two fewer than
    x * t / (t + 2), and runtimes run Softsign, Exp and BatchNormalization fast, but Softplus
    slowly (onnxruntime's took 5x the whole rest of the network) and ONNX's Mish too (with it,
    the whole network takes twice as long in onnxruntime 1.17 and 1.32). exp is capped where
    tanh(softplus(x)) has rounded to 1 already, x = 20 in float32 and 5.5 in float16 (whose z
    would overflow past 5.9), so z never reaches inf and Softsign never sees inf / inf. No
    cancellation: as x falls, z and Mish shrink together (float32: within 2.7e-7 relative of
    float64 Mish, as close as ATen's; float16: finite everywhere)."""
    exp = torch.exp(torch.clamp(x, max=5.5 if x.dtype == torch.float16 else 20.0))
    return x * _Softsign.apply(exp * _HalfPlusOne.apply(exp, int(exp.shape[1])))


def nested_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over channels, height and width as three nested means. Equal to one mean over
    all three, but each reduction adds only one axis's worth of terms: onnxruntime sums a single
    ReduceMean over a whole image sequentially in float32, and on s x2 that rounding alone moved
    outputs by 2e-4."""
    return values.mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True)


def group_norm_graph(
    x: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm(1) in operators strict ONNX shape inference follows, with float32 statistics
    for half-precision graphs (trained models' activations square past fp16's range).

    With an affine weight the centered values are multiplied by weight / sqrt(variance + eps),
    a [N, C, 1, 1] quotient of small tensors: one pass over the image, where a divide and a
    multiply would be two. Not rsqrt times the weight: the tracer writes rsqrt as Div(1, Sqrt),
    and onnxruntime's DivMulFusion then breaks the graph wherever the weight is a deduplicated
    constant (equal weights, as an untrained network has), failing the session at load."""
    values = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    centered = values - nested_mean(values)
    spread = torch.sqrt(nested_mean(centered * centered) + eps)
    if weight is None:
        normed = centered / spread
    else:
        normed = centered * (weight.to(spread.dtype).view(1, -1, 1, 1) / spread)
    if bias is not None:
        normed = normed + bias.to(normed.dtype).view(1, -1, 1, 1)
    # A float32 graph gets no Cast: the tracer writes one even where the type does not change.
    return normed if normed.dtype == x.dtype else normed.to(x.dtype)


class Moments:
    """GroupNorm(1) statistics gathered region by region: running per-sample sum and sum of
    squares in float64, for passes that never hold the whole map (exact tiling)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None
        self.count = 0

    def add(self, values: torch.Tensor) -> None:
        dims = tuple(range(1, values.ndim))
        total = values.sum(dim=dims, dtype=torch.float64)
        squares = torch.linalg.vector_norm(values, dim=dims, dtype=torch.float64).square()
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += values[0].numel()

    def merge(self, other: Moments) -> None:
        """Add the values ``other`` gathered (one band's, once the band is known to be done)."""
        if other.total is None or other.squares is None:
            return
        self.total = other.total if self.total is None else self.total + other.total
        self.squares = other.squares if self.squares is None else self.squares + other.squares
        self.count += other.count

    def normalizer(
        self, eps: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) shaped [N, C or 1, 1, 1] with GroupNorm(x) == x * scale + shift."""
        if self.total is None or self.squares is None:
            raise RuntimeError("no values were gathered for these statistics")
        mean = (self.total / self.count).view(-1, 1, 1, 1)
        variance = (self.squares / self.count).view(-1, 1, 1, 1) - mean.square()
        scale = (variance.clamp_(min=0) + eps).rsqrt()
        shift = -mean * scale
        if weight is not None:
            scale = scale * weight.view(1, -1, 1, 1)
            shift = shift * weight.view(1, -1, 1, 1)
        if bias is not None:
            shift = shift + bias.view(1, -1, 1, 1)
        return scale, shift


@dataclass(frozen=True)
class Numerics:
    """How GroupNorm(1) and Mish are computed, and whether the FFN runs in row bands.

    ``graph=False`` (:data:`EAGER`): ATen's fused GroupNorm, Mish overwriting its input, the FFN
    in cache-sized row bands. ``graph=True`` (:data:`GRAPH`): out-of-place operators whose
    traced graph holds at every image size (ONNX export, any tracer); ``mish_operator`` writes
    ONNX's own Mish (opset 18+) instead of Exp/Softsign; ``ffn_group`` (graphs only) computes
    the FFN's gated product in slices of that many hidden channels, see
    :meth:`InferenceBlock.ffn_delta`.
    """

    graph: bool = False
    mish_operator: bool = False
    ffn_group: int = 0

    def group_norm(
        self,
        x: torch.Tensor,
        eps: float,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.graph:
            return F.group_norm(x, 1, weight, bias, eps)
        return group_norm_graph(x, eps, weight, bias)

    def mish(self, x: torch.Tensor) -> torch.Tensor:
        if not self.graph:
            return mish_(x)
        return F.mish(x) if self.mish_operator else mish_graph(x)


EAGER = Numerics()
GRAPH = Numerics(graph=True)

# ----------------------------------------------------------------------------------------------
# The folded network.

BAND_BYTES = 8 << 20


def band_rows(bytes_per_row: int, height: int) -> int:
    """Rows per band so that one band's widest temporary holds about BAND_BYTES (at least 16
    rows, to keep the one-row halos cheap)."""
    return max(16, min(height, BAND_BYTES // max(1, bytes_per_row)))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


class InferenceBlock(nn.Module):
    """One ParagonBlock with its folds applied; :meth:`context` and :meth:`ffn_delta` are the
    block's arithmetic for every inference path."""

    ffn_halo = 1  # the 3x3 mixer's reach

    def __init__(self, block: ParagonBlock) -> None:
        super().__init__()
        context = block.context
        passthrough, branch = context.split_sizes[0], context.split_sizes[1]
        gamma1, gamma2 = _f64(block.ls1.gamma), _f64(block.ls2.gamma)

        norm1_scale = torch.ones_like(gamma1)
        norm1_scale[:passthrough] = gamma1[:passthrough]
        self.register_buffer("norm1_weight", _f64(block.norm1.weight) * norm1_scale)
        self.register_buffer("norm1_bias", _f64(block.norm1.bias) * norm1_scale)
        self.eps1 = block.norm1.eps
        self.split_sizes = context.split_sizes

        convs = (context.dwconv_hw, context.dwconv_w, context.dwconv_h)
        self.paddings = [conv.padding for conv in convs]
        for index, conv in enumerate(convs):
            start = passthrough + index * branch
            gamma = gamma1[start : start + branch]
            self.register_buffer(
                f"context{index}_weight", _f64(conv.weight) * gamma.view(-1, 1, 1, 1)
            )
            self.register_buffer(f"context{index}_bias", _f64(conv.bias) * gamma)

        ffn = block.transformer
        norm2_weight, norm2_bias = _f64(block.norm2.weight), _f64(block.norm2.bias)
        project_in = torch.cat((_f64(ffn.project_in_g.weight), _f64(ffn.project_in_i.weight)))
        project_in_bias = torch.cat((_f64(ffn.project_in_g.bias), _f64(ffn.project_in_i.bias)))
        self.register_buffer("project_in_weight", project_in * norm2_weight.view(1, -1, 1, 1))
        self.register_buffer(
            "project_in_bias", project_in_bias + project_in.flatten(1) @ norm2_bias
        )
        self.eps2 = block.norm2.eps
        self.hidden = ffn.project_in_g.out_channels

        mixer_weight, mixer_bias = ffn.spatial_mixer.fused_kernel()
        self.register_buffer("mixer_weight", _f64(mixer_weight))
        self.register_buffer("mixer_bias", _f64(mixer_bias))
        self.register_buffer(
            "project_out_weight", _f64(ffn.project_out.weight) * gamma2.view(-1, 1, 1, 1)
        )
        self.register_buffer("project_out_bias", _f64(ffn.project_out.bias) * gamma2)

    @property
    def context_halo(self) -> int:
        """How far the context convolutions reach, in pixels (the band kernel's half width)."""
        return max(max(padding) for padding in self.paddings)

    def context(self, residual: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """``residual + LayerScale(context(normed))`` for a region; ``normed`` is GroupNorm-1 of
        the residual with this block's folded affine (``norm1_weight``, ``norm1_bias``)."""
        passthrough, *branches = torch.split(normed, self.split_sizes, dim=1)
        convolved = [
            F.conv2d(
                part,
                getattr(self, f"context{index}_weight"),
                getattr(self, f"context{index}_bias"),
                padding=self.paddings[index],
                groups=part.shape[1],
            )
            for index, part in enumerate(branches)
        ]
        return torch.cat((passthrough, *convolved), dim=1).add_(residual)

    def ffn_delta(self, normed: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        """``LayerScale(ffn(normed))`` for a region; ``normed`` is GroupNorm-2's output without
        affine (folded into the projection). Reaches :attr:`ffn_halo` pixel.

        Graphs with ``numerics.ffn_group`` compute the gated product slice by slice of hidden
        channels, concatenated before the output projection: the same arithmetic, but each
        slice's chain of elementwise operators (Mish, gating) then works on a temporary small
        enough to stay in cache, which a runtime running one whole-image operator after another
        (onnxruntime) otherwise streams through memory every time (s x2: 14% faster at 128 to
        512 pixels). 16 channels are one block of onnxruntime's AVX-512 layout."""
        hidden = self.hidden
        width = numerics.ffn_group if numerics.graph and numerics.ffn_group else hidden
        products = []
        for start in range(0, hidden, width):
            part = slice(start, min(start + width, hidden))
            # Two convolutions, not one and a split: onnxruntime reorders the blocked layout of
            # its convolution outputs around every Split, which costs more than it saves.
            gate = F.conv2d(
                normed, self.project_in_weight[:hidden][part], self.project_in_bias[:hidden][part]
            )
            value = F.conv2d(
                normed, self.project_in_weight[hidden:][part], self.project_in_bias[hidden:][part]
            )
            gate = F.conv2d(
                gate,
                self.mixer_weight[part],
                self.mixer_bias[part],
                padding=1,
                groups=gate.shape[1],
            )
            products.append(numerics.mish(gate) * value)
        product = products[0] if len(products) == 1 else torch.cat(products, dim=1)
        return F.conv2d(product, self.project_out_weight, self.project_out_bias)

    def forward(self, x: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        x = self.context(x, numerics.group_norm(x, self.eps1, self.norm1_weight, self.norm1_bias))
        normed = numerics.group_norm(x, self.eps2)
        if numerics.graph:
            return x + self.ffn_delta(normed, numerics)
        # The FFN runs in bands of rows. Its temporaries are 2*hidden channels wide; whole-image
        # ones cost page faults on every allocation (glibc returns big blocks to the system) and
        # fall out of cache between the elementwise passes. Each band reads its halo row from
        # `normed`, never from x, so x can be updated in place band by band.
        height, width = x.shape[2:]
        rows = band_rows(x.shape[0] * width * 2 * self.hidden * x.element_size(), height)
        run_tiled(
            lambda region: self.ffn_delta(normed[..., region.top : region.bottom, :], numerics),
            grid(height, width, rows, width),
            self.ffn_halo,
            height,
            width,
            lambda tile, delta: x[..., tile.top : tile.bottom, :].add_(delta),
        )
        return x


def composite_tail_kernel(
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    scale: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5x5 low-resolution kernel equal to conv3x3 -> PixelShuffle(scale) -> conv3x3 (interior).

    Output channel ``o*s*s + a*s + b`` holds high-resolution sub-pixel (a, b) of channel o, so a
    PixelShuffle of the composite output lines up with the original.
    """
    s = scale
    nf = out_weight.shape[1]
    out_ch = out_weight.shape[0]
    up = up_weight.reshape(nf, s, s, *up_weight.shape[1:])  # [c, a2, b2, k, 3, 3]
    up_b = up_bias.reshape(nf, s, s)
    kernel = up_weight.new_zeros(out_ch, s, s, up_weight.shape[1], 5, 5)
    bias = out_bias.view(out_ch, 1, 1).repeat(1, s, s)
    for a in range(s):
        for b in range(s):
            for dy in (-1, 0, 1):
                lr_y, a2 = divmod(a + dy, s)
                for dx in (-1, 0, 1):
                    lr_x, b2 = divmod(b + dx, s)
                    tap = out_weight[:, :, dy + 1, dx + 1]  # [o, c]
                    kernel[:, a, b, :, lr_y + 1 : lr_y + 4, lr_x + 1 : lr_x + 4] += torch.einsum(
                        "oc,ckyx->okyx", tap, up[:, a2, b2]
                    )
                    bias[:, a, b] += tap @ up_b[:, a2, b2]
    return kernel.reshape(out_ch * s * s, -1, 5, 5), bias.reshape(-1)


# What a ParagonSR module has and its optimized copy has not: named in the error for a caller
# who reaches for them (a hook on body[0], an exporter expecting the original's layers).
_PLAIN_ONLY = ("body", "conv_in", "conv_fuse", "upsampler", "conv_out", "form", "spatial_mixers")


class OptimizedParagonSR(nn.Module):
    """Inference-only ParagonSR with every fold applied; see the module docstring.

    A standalone copy: it holds its own folded weights, so later changes to the ParagonSR it was
    made from do not reach it (make a new one). It never trains.
    """

    tail_halo = 2  # the collapsed 5x5 kernel's reach, in low-resolution pixels
    head_halo = 1
    # An eager CPU call runs on the cores other work leaves free (paragonsr.cpu_threads), never
    # on more threads than the host set; False keeps the host's thread count throughout.
    share_cores = True

    def __init__(
        self, model: ParagonSR, channels_last: bool = True, numerics: Numerics = EAGER
    ) -> None:
        super().__init__()
        if not isinstance(model, ParagonSR):
            raise TypeError(not_a_plain_network(model, "optimize_for_inference"))
        self.config = model.config
        self.scale = model.config.scale
        self.channels_last = channels_last
        self.numerics = numerics
        self.register_buffer("conv_in_weight", _f64(model.conv_in.weight))
        self.register_buffer("conv_in_bias", _f64(model.conv_in.bias))
        self.groups = nn.ModuleList(
            nn.ModuleList(InferenceBlock(block) for block in group.blocks) for group in model.body
        )
        self.register_buffer("conv_fuse_weight", _f64(model.conv_fuse.weight))
        self.register_buffer("conv_fuse_bias", _f64(model.conv_fuse.bias))
        up, out = model.upsampler[0], model.conv_out
        for name, tensor in (
            ("up_weight", up.weight),
            ("up_bias", up.bias),
            ("out_weight", out.weight),
            ("out_bias", out.bias),
        ):
            self.register_buffer(name, _f64(tensor))
        tail_weight, tail_bias = composite_tail_kernel(
            self.up_weight, self.up_bias, self.out_weight, self.out_bias, self.scale
        )
        self.register_buffer("tail_weight", tail_weight)
        self.register_buffer("tail_bias", tail_bias)
        reference = next(model.parameters())
        self.to(device=reference.device, dtype=reference.dtype)
        self.eval()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _PLAIN_ONLY:
                raise AttributeError(
                    f"OptimizedParagonSR has no {name!r}: it is the folded, inference-only copy "
                    "made by optimize_for_inference. Hooks, exporters and weight edits belong on "
                    "the ParagonSR module it was made from (its forward is the plain network)"
                ) from None
            raise

    def train(self, mode: bool = True) -> OptimizedParagonSR:
        if mode:
            raise RuntimeError(
                "OptimizedParagonSR is inference-only and cannot train: train the ParagonSR "
                "module and call optimize_for_inference on it afterwards"
            )
        return super().train(False)

    @property
    def blocks(self) -> list[InferenceBlock]:
        return [block for group in self.groups for block in group]

    def head(self, image: torch.Tensor) -> torch.Tensor:
        """The shallow features of an image region (reach :attr:`head_halo`)."""
        return F.conv2d(image, self.conv_in_weight, self.conv_in_bias, padding=1)

    def fuse(self, deep: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        """The body's closing convolution plus the long skip (reach 1)."""
        return F.conv2d(deep, self.conv_fuse_weight, self.conv_fuse_bias, padding=1).add_(shallow)

    def tail_exact(self, x: torch.Tensor) -> torch.Tensor:
        upsampled = F.pixel_shuffle(
            F.conv2d(x, self.up_weight, self.up_bias, padding=1), self.scale
        )
        return F.conv2d(upsampled, self.out_weight, self.out_bias, padding=1)

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Upsampler and output convolution of a region (reach :attr:`tail_halo`), border pixels
        exact."""
        height, width = x.shape[-2:]
        if height < 3 or width < 3:
            return self.tail_exact(x)
        s = self.scale
        fast = F.pixel_shuffle(F.conv2d(x, self.tail_weight, self.tail_bias, padding=2), s)
        # Only the outermost output row/column sees conv_out's padding of the intermediate map.
        # It needs the intermediate rows 0 and 1: low-resolution row 0 alone when s >= 2, which
        # in turn needs input rows 0-1; rows 0-1 (input rows 0-2) when s == 1.
        rows = 2 if s > 1 else 3
        top = self.tail_exact(x[:, :, :rows])[:, :, :1]
        bottom = self.tail_exact(x[:, :, -rows:])[:, :, -1:]
        left = self.tail_exact(x[:, :, :, :rows])[:, :, 1:-1, :1]
        right = self.tail_exact(x[:, :, :, -rows:])[:, :, 1:-1, -1:]
        middle = torch.cat((left, fast[:, :, 1:-1, 1:-1], right), dim=3)
        return torch.cat((top, middle, bottom), dim=2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        if not self.share_cores or image.device.type != "cpu" or self.numerics.graph or _tracing():
            return self._passes(image, None)
        with FreeCoreThreads() as threads:
            return self._passes(image, threads)

    def _passes(self, image: torch.Tensor, threads: FreeCoreThreads | None) -> torch.Tensor:
        shallow = self.head(image)
        deep = shallow
        for group in self.groups:
            if threads is not None:
                threads.check()  # other work may have started or ended since
            start = deep
            for block in group:
                deep = block(deep, self.numerics)
            deep = deep.add_(start)  # the last block returned a tensor of its own
        if threads is not None:
            threads.check()
        return self.tail(self.fuse(deep, shallow)).contiguous()


@torch.no_grad()
def optimize_for_inference(
    model: ParagonSR, channels_last: bool = True, numerics: Numerics = EAGER
) -> OptimizedParagonSR:
    """A standalone inference-only copy of ``model`` (either form) with every fold applied, on
    ``model``'s device and dtype. ``numerics=GRAPH`` gives the form to trace or export."""
    return OptimizedParagonSR(model, channels_last=channels_last, numerics=numerics)


def _tracing() -> bool:
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return torch.jit.is_tracing() or (compiling is not None and compiling())


class OptimizedCall:
    """The call function of ParagonSR's spandrel descriptors (``ImageModelDescriptor(call_fn=)``):
    every host that upscales through the descriptor (ComfyUI's stock node, chaiNNer's PyTorch
    node, this package) runs the optimized network, built from the model's current weights.

    It holds that network and a snapshot of the weights it was folded from (together about
    twice the weights' memory: 6 MB for s, 90 MB for xl in fp32). Before each call the model's
    weights are compared with the snapshot, so editing a weight in place, inside
    ``torch.inference_mode()`` too, rebuilds the network instead of returning a stale result.
    Moving or converting the model drops both at once (``ParagonSR.call_after_move``): when a
    host offloads the model, nothing of this copy stays on the device. :meth:`release` drops
    them on request. Gradients do not flow through it: train ``descriptor.model``.

    Traced or compiled calls (``torch.onnx.export``, ``torch.jit.trace``, ``torch.compile`` of
    the descriptor, as chaiNNer's Convert To ONNX does) run ``model(image)``, the plain network,
    so the graph is the original architecture and valid at every size. ``paragonsr export``
    writes the faster folded graph.
    """

    def __init__(self) -> None:
        self._network: OptimizedParagonSR | None = None
        self._snapshot: torch.Tensor | None = None

    def __call__(self, model: ParagonSR, image: torch.Tensor) -> torch.Tensor:
        if _tracing():
            return model(image)
        return self.network(model)(image)

    def network(self, model: ParagonSR) -> OptimizedParagonSR:
        """The optimized network for ``model``'s current weights, device and dtype."""
        with torch.no_grad():
            weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            snapshot = self._snapshot
            if (
                self._network is None
                or snapshot is None
                or snapshot.dtype != weights.dtype
                or snapshot.device != weights.device
                or not torch.equal(snapshot, weights)
            ):
                self.release()  # free the stale copy before building the new one
                self._network = optimize_for_inference(model)
                self._snapshot = weights
                model.call_after_move(self.release)
        return self._network

    def release(self) -> None:
        """Drop the optimized network and the snapshot; the next call builds them again."""
        self._network = self._snapshot = None

"""The model zoo: tiny, seeded PyTorch models that the importers and benchmarks share.

`MODELS[name](dtype=torch.float32, batch=BATCH)` returns `(module, args, kwargs)`: the
module in train() mode, already converted to `dtype`, and example inputs of `batch`
examples for `module(*args, **kwargs)`. Float inputs have `dtype`; token ids and
attention masks are int64 and are listed in `INTEGER_INPUTS[name]` (by the name of
forward's argument) so tests know not to differentiate them. Every call builds the same
weights and inputs (fixed seeds).

    >>> import torch, zoo
    >>> module, args, kwargs = zoo.MODELS["resnet"](torch.float64)
    >>> module.training, args[0].dtype, kwargs
    (True, torch.float64, {})
    >>> zoo.input_names("gpt2")
    ['input_ids', 'attention_mask']

Plain PyTorch plus `transformers` (GPT-2, BERT); never torchvision, whose PyPI wheel
targets CUDA and breaks the CPU torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 2
IMAGE = 16  # height and width of the image models' inputs
SEQ = 8  # sequence length of the language models
VOCAB = 64
# Transformer layers. With two, one layer's backward needs more than half of what
# store_all keeps, so no schedule fits half of its peak; real models are deeper.
LAYERS = 4


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _finish(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    return module.to(dtype).train()


def _image(dtype: torch.dtype, batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=_seeded(seed)).to(dtype)


# --- ResNet ---------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    """Stem conv+bn+relu+maxpool, two stages of two BasicBlocks (ResNet-18's layout with
    two stages; the second downsamples), adaptive average pool, fully connected head."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(
            BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width)
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(dtype: torch.dtype = torch.float32, batch: int = BATCH):
    torch.manual_seed(0)
    return _finish(ResNet(), dtype), (_image(dtype, batch),), {}


# --- U-Net ----------------------------------------------------------------------------
class DoubleConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Two levels down, a bottleneck, two levels up: the first up-step is a
    ConvTranspose2d, the second nearest upsampling (scale 2) plus a 1x1 conv; each
    concatenates the encoder's feature map of the same size (skip connections)."""

    def __init__(self, width: int = 4, classes: int = 2):
        super().__init__()
        self.enc1 = DoubleConv(3, width)
        self.enc2 = DoubleConv(width, 2 * width)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = DoubleConv(4 * width, 2 * width)
        self.up1 = nn.Conv2d(2 * width, width, 1)
        self.dec1 = DoubleConv(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        u1 = self.up1(F.interpolate(d2, scale_factor=2, mode="nearest"))
        d1 = self.dec1(torch.cat([u1, e1], dim=1))
        return self.head(d1)


def unet(dtype: torch.dtype = torch.float32, batch: int = BATCH):
    torch.manual_seed(0)
    return _finish(UNet(), dtype), (_image(dtype, batch),), {}


# --- GPT-2 and BERT (transformers) ------------------------------------------------------
def _token_ids(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=_seeded(seed))


def _padding_mask(batch: int) -> torch.Tensor:
    """All ones except the last two positions of every second sequence (right padding)."""
    mask = torch.ones(batch, SEQ, dtype=torch.int64)
    mask[1::2, -2:] = 0
    return mask


def gpt2(dtype: torch.dtype = torch.float32, batch: int = BATCH):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=2 * SEQ,
        n_embd=32,
        n_layer=LAYERS,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    )
    torch.manual_seed(0)
    # Returns a ModelOutput (a dict: its one tensor is "logits"); BERT below a tuple.
    module = GPT2LMHeadModel(config)
    kwargs = {"attention_mask": _padding_mask(batch)}
    return _finish(module, dtype), (_token_ids(batch, 2),), kwargs


def bert(dtype: torch.dtype = torch.float32, batch: int = BATCH):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=2 * SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        return_dict=False,
    )
    torch.manual_seed(0)
    module = BertModel(config)
    token_type_ids = torch.zeros(batch, SEQ, dtype=torch.int64)
    token_type_ids[:, SEQ // 2 :] = 1
    mask = _padding_mask(batch)
    # Padded positions hold the pad token (id 0, BERT's padding_idx) as real batches do.
    ids = torch.where(mask.bool(), _token_ids(batch, 3).clamp(min=1), 0)
    kwargs = {"attention_mask": mask, "token_type_ids": token_type_ids}
    return _finish(module, dtype), (ids,), kwargs


# --- LLaMA-style block -------------------------------------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: RMSNorm, causal self-attention with rotary position
    embeddings (F.scaled_dot_product_attention, is_causal=True), RMSNorm, SiLU-gated
    MLP; residual connections around both. The rotary cos/sin tables are computed once
    in __init__ (non-persistent buffers), as in most LLaMA implementations."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64, max_seq: int = 16):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.attn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim, eps=1e-6)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, self.head_dim, 2).double() / self.head_dim))
        angles = torch.outer(torch.arange(max_seq).double(), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        batch, seq, dim = x.shape
        h = self.attn_norm(x)
        q, k, v = self._heads(self.wq(h)), self._heads(self.wk(h)), self._heads(self.wv(h))
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(attn.transpose(1, 2).reshape(batch, seq, dim))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    """`layers` LLaMA blocks in a row (the decoder stack without embeddings and head)."""

    def __init__(self, layers: int = LAYERS):
        super().__init__()
        self.layers = nn.ModuleList(LlamaBlock() for _ in range(layers))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def llama(dtype: torch.dtype = torch.float32, batch: int = BATCH):
    torch.manual_seed(0)
    x = torch.randn(batch, SEQ, 32, generator=_seeded(4)).to(dtype)
    return _finish(Llama(), dtype), (x,), {}


MODELS = {
    "resnet": resnet,
    "unet": unet,
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
}

# forward's integer arguments (token ids, attention masks): not differentiable.
INTEGER_INPUTS = {
    "resnet": frozenset(),
    "unet": frozenset(),
    "gpt2": frozenset({"input_ids", "attention_mask"}),
    "bert": frozenset({"input_ids", "attention_mask", "token_type_ids"}),
    "llama": frozenset(),
}

# The names of forward's arguments the example inputs bind, positional first.
INPUT_NAMES = {
    "resnet": ("x",),
    "unet": ("x",),
    "gpt2": ("input_ids", "attention_mask"),
    "bert": ("input_ids", "attention_mask", "token_type_ids"),
    "llama": ("x",),
}


def input_names(name: str) -> list[str]:
    """The names of a zoo model's example inputs, positional first, then keywords."""
    return list(INPUT_NAMES[name])


def inputs(
    name: str, dtype: torch.dtype = torch.float32, batch: int = BATCH
) -> dict[str, torch.Tensor]:
    """A zoo model's example inputs by name (the names of forward's arguments)."""
    _, args, kwargs = MODELS[name](dtype, batch=batch)
    return {**dict(zip(INPUT_NAMES[name], args)), **kwargs}


def float_inputs(name: str) -> list[str]:
    """The names of a zoo model's float (differentiable) inputs."""
    return [n for n in INPUT_NAMES[name] if n not in INTEGER_INPUTS[name]]

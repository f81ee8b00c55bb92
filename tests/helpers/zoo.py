"""Models written the way real projects write them, not shaped for the library.

- :class:`GPT`: nanoGPT's model.py (Karpathy), condensed: token and position embeddings, a
  ``nn.ModuleList`` of pre-norm blocks inside a ``nn.ModuleDict``, a custom LayerNorm with optional
  bias, causal self-attention through ``scaled_dot_product_attention``, an LM head tied to the token
  embedding, ``forward(idx, targets=None)`` returning ``(logits, loss)``, and its own
  ``configure_optimizers(weight_decay, learning_rate, betas, device_type)`` that the
  LightningModule calls through ``self.model`` (as nanoGPT's Lightning ports do).
- :class:`ResNet`: torchvision's resnet.py, condensed: ``BasicBlock`` with BatchNorm, in-place ReLU,
  a 1x1 downsample on the skip path, ``_make_layer`` Sequentials, adaptive average pooling.
- :class:`LSTMClassifier`: embedding, a two-layer ``nn.LSTM``, the final hidden state, a head.
- :class:`SkipNet`: a U-Net-like encoder/decoder whose skip connections jump over whole stages,
  with keyword arguments, an optional mask and integer tensors.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = 32
    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 16
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False"""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return y


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        x = self.dropout(x)
        return x


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))  # fmt: skip
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # start with all of the candidate parameters
        param_dict = {pn: p for pn, p in self.named_parameters()}
        # filter out those that do not require grad
        param_dict = {pn: p for pn, p in param_dict.items() if p.requires_grad}
        # create optim groups. Any parameters that is 2D will be weight decayed, otherwise no.
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        extra_args = dict(fused=True) if use_fused else dict()
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference-time mini-optimization: only the last position
            loss = None
        return logits, loss


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, layers: list[int] = [2, 2], num_classes: int = 10, width: int = 8) -> None:  # noqa: B006
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


class LSTMClassifier(nn.Module):
    """A text classifier as tutorials write one: embedding, a two-layer ``nn.LSTM`` (its weights kept
    in the layer's own flat list, held by weak reference), the last layer's final hidden state, a
    linear head; ``num_classes`` kept as an attribute."""

    def __init__(self, vocab_size: int = 32, embed_dim: int = 8, hidden_dim: int = 12, num_classes: int = 4,
                 num_layers: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers=num_layers, batch_first=True)
        self.proj = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.fc = nn.Linear(hidden_dim, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(input_ids)
        _, (h, _) = self.lstm(emb)
        return self.fc(self.proj(h[-1]))


class SkipNet(nn.Module):
    """Encoder -> middle -> decoder with skips from each encoder level to its decoder level (each
    skip crosses the stages in between), a keyword mask, integer positions and two outputs."""

    def __init__(self, width: int = 8, n_positions: int = 16) -> None:
        super().__init__()
        self.pos = nn.Embedding(n_positions, width)
        self.down = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.middle = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.up = nn.ModuleList([nn.Linear(2 * width, width) for _ in range(2)])
        self.head = nn.Linear(width, 3)

    def forward(self, x, positions, mask=None, scale: float = 1.0):
        h = x + self.pos(positions)
        skips = []
        for layer in self.down:
            h = torch.tanh(layer(h))
            skips.append(h)
        h = self.middle(h)
        for layer, skip in zip(self.up, reversed(skips)):
            h = torch.tanh(layer(torch.cat([h, skip], dim=-1)))
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.head(h) * scale, h.mean()


# ---------------------------------------------------------------------------------------------- Lightning

import lightning as L  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402


class GPTModule(L.LightningModule):
    """A nanoGPT in Lightning, as such projects write it: the GPT in ``self.model``, the loss from
    the model's own forward, AdamW with weight decay on matrices only (nanoGPT's
    ``configure_optimizers``, called through ``self.model``), the model's ``config`` read in the
    step, the loss logged with ``log_dict``.

    ``bias=False`` (nanoGPT's option): with biases, the key projection's bias has an exactly zero
    gradient (softmax ignores a shift of all scores), so its float32 gradient is rounding noise
    that AdamW scales to full-size steps: two summation orders of the same run diverge there,
    on one device as well, and no equality test can hold on it."""

    def __init__(self, n_layer: int = 4, lr: float = 1e-2, bias: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(GPTConfig(n_layer=n_layer, bias=bias))

    def forward(self, idx, targets=None):
        return self.model(idx, targets)

    def training_step(self, batch, batch_idx):
        idx, targets = batch
        assert idx.size(1) <= self.model.config.block_size
        _, loss = self(idx, targets)
        self.log_dict({"train_loss": loss})
        return loss

    def validation_step(self, batch, batch_idx):
        idx, targets = batch
        _, loss = self(idx, targets)
        self.log("val_loss", loss)

    def configure_optimizers(self):
        return self.model.configure_optimizers(0.1, self.hparams.lr, (0.9, 0.95), self.device.type)


def token_loader(n: int = 48, t: int = 12, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Next-token pairs from random sequences over the 32-symbol vocabulary."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 32, (n, t + 1), generator=g)
    return DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=batch_size)


class ResNetModule(L.LightningModule):
    """A torchvision-style classifier in Lightning: the network in ``self.model``, cross-entropy,
    SGD with momentum and weight decay."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ResNet()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)


def image_loader(n: int = 48, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Random 3x8x8 images in 10 classes."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=batch_size)  # fmt: skip


class LSTMModule(L.LightningModule):
    """A sequence classifier in Lightning: the network in ``self.net``, the class count read from it,
    cross-entropy, Adam, the loss logged with ``log_dict``."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = LSTMClassifier()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.view(-1, self.net.num_classes), y)
        self.log_dict({"train_loss": loss})
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def sequence_loader(n: int = 48, t: int = 10, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Random token sequences whose class is their first token modulo 4."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 32, (n, t), generator=g)
    return DataLoader(TensorDataset(x, x[:, 0] % 4), batch_size=batch_size)

"""AlexNet as section 3 of Krizhevsky, Sutskever & Hinton (NIPS 2012) describes it.

Read this file beside the paper; each block names the paragraph it implements.

The paper's net was split over two GTX 580s ("columns"). This is the single-device form of that
two-column net: every layer whose kernels in the paper see only their own GPU's maps is a grouped layer
with ``groups=2`` (conv2, conv4, conv5), and so is the response normalisation after conv1 and conv2 (each
GPU normalised over its own kernel maps). conv3, fc6 and fc7 see both columns, so they are ordinary
layers. ``trainer/parallel.py`` places the two columns on two devices without changing this function.

    layer   paper                 here (width=1)                        output (224 input)
    conv1   96 x 11x11x3, s4      Conv2d(3, 96, 11, stride 4, pad 2)     96 x 55 x 55
            ReLU, LRN, max-pool 3/2                                      96 x 27 x 27
    conv2   256 x 5x5x48          Conv2d(96, 256, 5, pad 2, groups 2)   256 x 27 x 27
            ReLU, LRN, max-pool 3/2                                     256 x 13 x 13
    conv3   384 x 3x3x256         Conv2d(256, 384, 3, pad 1)            384 x 13 x 13
    conv4   384 x 3x3x192         Conv2d(384, 384, 3, pad 1, groups 2)  384 x 13 x 13
    conv5   256 x 3x3x192         Conv2d(384, 256, 3, pad 1, groups 2)  256 x 13 x 13
            ReLU, max-pool 3/2                                          256 x 6 x 6
    fc6     4096                  Linear(9216, 4096), ReLU, dropout 0.5
    fc7     4096                  Linear(4096, 4096), ReLU, dropout 0.5
    fc8     1000-way softmax      Linear(4096, num_classes) (softmax lives in the loss)

The paper's "224x224" input does not tile: (224 - 11) / 4 + 1 is not whole. Padding conv1 by 2 (as
torchvision does) gives the paper's 55x55 maps; a 227 input without padding gives the same sizes.
With 1000 classes the network has 60,965,224 parameters.

``image_size`` (default 224) only changes fc6's input size: the feature maps into fc6 are
``feature_map_size(image_size, pool)`` squared (6 x 6 at 224). Smaller inputs make CPU runs and tests cheaper.

Variants for ablations (docs/training.md, "Model options" and "Ablations"), each a keyword argument that
defaults to the paper's choice:

- ``lrn=False`` drops both response normalisations (section 3.3 reports +1.4 / +1.2 points top-1 / top-5
  error without them).
- ``lrn_alpha``: how the paper's alpha = 1e-4 is read. ``"cuda-convnet"`` (the default, chosen by measurement:
  docs/training.md, "Model options"): 1e-4 / n = 2e-5 per squared neighbour, what Krizhevsky's cuda-convnet
  (which divides its configured scale by the window size), Caffe and ``torch.nn.LocalResponseNorm(alpha=1e-4)``
  compute. ``"paper"``: 1e-4 multiplies the sum of the n = 5 squared neighbours, as section 3.3's formula is
  printed.
- ``pool="non-overlapping"``: 2x2 max-pools with stride 2 instead of 3x3 with stride 2 (section 3.4: +0.4 /
  +0.3 points). At 224 the maps keep their sizes (55 -> 27 -> 13 -> 6); at some smaller inputs conv5's
  pooled maps are one pixel larger, and fc6's input follows (``feature_map_size``).
- ``columns=1``: the one-GPU net section 3.2 compares against (the two-column net is 1.7 / 1.2 points
  better). Its footnote: the one-GPU net has half the kernels of the two-GPU net in conv1-conv4, but the same
  number in the last convolutional layer (conv5) and in the fully-connected layers, because fc6 holds most of
  the parameters and reads conv5. So conv1-conv4 have 48, 128, 192, 192 kernels (times ``width``), conv5 256
  and fc6/fc7 4096; no layer is grouped and each LRN normalises over all of its layer's maps.
- ``activation="tanh"``: the saturating non-linearity of section 3.1's Figure 1 in place of every ReLU.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

# Section 3.3, "Local Response Normalization": k = 2, n = 5, alpha = 1e-4, beta = 0.75.
LRN_K, LRN_N, LRN_ALPHA, LRN_BETA = 2.0, 5, 1e-4, 0.75
# The coefficient of each squared neighbour under either reading of alpha (module docstring).
LRN_ALPHA_PER_TERM = {"paper": LRN_ALPHA, "cuda-convnet": LRN_ALPHA / LRN_N}
# Section 3.4, "Overlapping Pooling": s = 2, z = 3; the traditional non-overlapping pool it compares with, s = z = 2.
POOLS = {"overlapping": (3, 2), "non-overlapping": (2, 2)}
POOL_SIZE, POOL_STRIDE = POOLS["overlapping"]
ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}
# Section 4.2, "Dropout": probability 0.5 on the first two fully-connected layers.
DROPOUT = 0.5
# The paper's widths, used at width=1.0.
PAPER_WIDTHS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256, "fc6": 4096, "fc7": 4096}
# Section 5: "We initialized the neuron biases in the second, fourth, and fifth convolutional layers, as
# well as in the fully-connected hidden layers, with the constant 1 ... the remaining layers with 0."
BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")
COLUMNS = 2  # two GTX 580s
# Section 3.2, footnote 2: the one-GPU net halves these layers and keeps conv5, fc6 and fc7 whole.
HALVED_IN_ONE_COLUMN = ("conv1", "conv2", "conv3", "conv4")


def scaled_widths(width: float, columns: int = COLUMNS) -> dict[str, int]:
    """Every conv and fc width times ``width``, rounded to an even number so both columns are equal; with
    ``columns=1`` conv1-conv4 then have half of that (the one-GPU net of section 3.2)."""
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a positive number, got {width!r}")
    if columns not in (1, COLUMNS):
        raise ValueError(f"columns must be 1 or {COLUMNS}, got {columns!r}")
    two = {name: max(COLUMNS, COLUMNS * round(base * width / COLUMNS)) for name, base in PAPER_WIDTHS.items()}
    if columns == 1:
        return {name: w // COLUMNS if name in HALVED_IN_ONE_COLUMN else w for name, w in two.items()}
    return two


def feature_map_size(image_size: int, pool: str = "overlapping") -> int:
    """Side of conv5's pooled maps for a square input: conv1 (11, stride 4, pad 2) and three max-pools."""
    size, stride = POOLS[pool]
    side = (image_size + 2 * 2 - 11) // 4 + 1
    for _ in range(3):
        side = (side - size) // stride + 1
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for AlexNet; use at least 63")
    return side


class ColumnLRN(nn.Module):
    """Response normalisation across adjacent kernel maps *within each column* (section 3.3).

    b = a / (k + alpha * sum_{j in n neighbours} a_j^2) ^ beta, the sum running over at most n maps of
    the same GPU. ``alpha`` here is the coefficient of each squared neighbour (``LRN_ALPHA_PER_TERM``).
    torch's ``local_response_norm`` divides the alpha it is given by n, so it is given ``alpha * n``.
    """

    def __init__(self, columns: int = COLUMNS, size: int = LRN_N, alpha: float = LRN_ALPHA,
                 beta: float = LRN_BETA, k: float = LRN_K):
        super().__init__()
        self.columns, self.size, self.alpha, self.beta, self.k = columns, size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.normalise(part) for part in x.chunk(self.columns, dim=1)], dim=1)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm(x, self.size, alpha=self.alpha * self.size, beta=self.beta, k=self.k)

    def extra_repr(self) -> str:
        return f"columns={self.columns}, size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class AlexNet(nn.Module):
    """The paper's eight learned layers. ``width`` scales every conv and fc width (1.0 = the paper)."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = DROPOUT,
                 init: str = "paper", image_size: int = 224, *, lrn: bool = True,
                 lrn_alpha: str = "cuda-convnet", pool: str = "overlapping", columns: int = COLUMNS,
                 activation: str = "relu"):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        for name, value, allowed in (("lrn_alpha", lrn_alpha, LRN_ALPHA_PER_TERM), ("pool", pool, POOLS),
                                     ("activation", activation, ACTIVATIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        w = scaled_widths(width, columns)
        self.num_classes, self.width, self.widths, self.image_size = num_classes, width, w, image_size
        self.columns, self.activation = columns, activation
        self.act = ACTIVATIONS[activation]
        side = feature_map_size(image_size, pool)
        g = columns
        self.conv1 = nn.Conv2d(3, w["conv1"], kernel_size=11, stride=4, padding=2)
        self.conv2 = nn.Conv2d(w["conv1"], w["conv2"], kernel_size=5, padding=2, groups=g)
        self.conv3 = nn.Conv2d(w["conv2"], w["conv3"], kernel_size=3, padding=1)  # sees both columns
        self.conv4 = nn.Conv2d(w["conv3"], w["conv4"], kernel_size=3, padding=1, groups=g)
        self.conv5 = nn.Conv2d(w["conv4"], w["conv5"], kernel_size=3, padding=1, groups=g)
        self.fc6 = nn.Linear(w["conv5"] * side * side, w["fc6"])  # sees both columns
        self.fc7 = nn.Linear(w["fc6"], w["fc7"])             # sees both columns
        self.fc8 = nn.Linear(w["fc7"], num_classes)
        self.lrn = ColumnLRN(g, alpha=LRN_ALPHA_PER_TERM[lrn_alpha]) if lrn else nn.Identity()
        self.pool = nn.MaxPool2d(*POOLS[pool])
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "paper") -> None:
        """``paper``: weights N(0, 0.01), biases 1 in conv2/4/5 and fc6/7, 0 elsewhere (section 5).
        ``kaiming``: He-normal weights for the ReLU layers, biases 0; the paper's init barely moves a small,
        reduced-width network in its first epochs, so the ``modern`` preset uses this."""
        if init not in ("paper", "kaiming"):
            raise ValueError(f"init must be 'paper' or 'kaiming', got {init!r}")
        for name, layer in self.learned_layers():
            if init == "paper":
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
                nn.init.constant_(layer.bias, 1.0 if name in BIAS_ONE_LAYERS else 0.0)
            else:
                if name == "fc8":
                    nn.init.normal_(layer.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity=self.activation)
                nn.init.zeros_(layer.bias)

    def learned_layers(self):
        return [(n, getattr(self, n)) for n in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act
        x = self.pool(self.lrn(act(self.conv1(x))))      # conv1 -> ReLU -> LRN -> overlapping max-pool
        x = self.pool(self.lrn(act(self.conv2(x))))      # conv2 -> ReLU -> LRN -> overlapping max-pool
        x = act(self.conv3(x))
        x = act(self.conv4(x))
        x = self.pool(act(self.conv5(x)))                # conv5 -> ReLU -> overlapping max-pool
        return x

    def classifier(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.dropout(self.act(self.fc6(x)))          # dropout on the *outputs* of fc6 and fc7
        x = self.dropout(self.act(self.fc7(x)))
        return self.fc8(x)                               # logits; softmax is in the loss / at eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

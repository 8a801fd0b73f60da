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
``feature_map_size(image_size)`` squared (6 x 6 at 224). Smaller inputs make CPU runs and tests cheaper.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

# Section 3.3, "Local Response Normalization": k = 2, n = 5, alpha = 1e-4, beta = 0.75.
LRN_K, LRN_N, LRN_ALPHA, LRN_BETA = 2.0, 5, 1e-4, 0.75
# Section 3.4, "Overlapping Pooling": s = 2, z = 3.
POOL_SIZE, POOL_STRIDE = 3, 2
# Section 4.2, "Dropout": probability 0.5 on the first two fully-connected layers.
DROPOUT = 0.5
# The paper's widths, used at width=1.0.
PAPER_WIDTHS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256, "fc6": 4096, "fc7": 4096}
# Section 5: "We initialized the neuron biases in the second, fourth, and fifth convolutional layers, as
# well as in the fully-connected hidden layers, with the constant 1 ... the remaining layers with 0."
BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")
COLUMNS = 2  # two GTX 580s


def scaled_widths(width: float) -> dict[str, int]:
    """Every conv and fc width times ``width``, rounded to an even number so both columns are equal."""
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a positive number, got {width!r}")
    return {name: max(COLUMNS, COLUMNS * round(base * width / COLUMNS)) for name, base in PAPER_WIDTHS.items()}


def feature_map_size(image_size: int) -> int:
    """Side of conv5's pooled maps for a square input: conv1 (11, stride 4, pad 2) and three 3/2 pools."""
    side = (image_size + 2 * 2 - 11) // 4 + 1
    for _ in range(3):
        side = (side - POOL_SIZE) // POOL_STRIDE + 1
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for AlexNet; use at least 63")
    return side


class ColumnLRN(nn.Module):
    """Response normalisation across adjacent kernel maps *within each column* (section 3.3).

    b = a / (k + alpha * sum_{j in n neighbours} a_j^2) ^ beta, the sum running over at most n maps of
    the same GPU. torch's ``local_response_norm`` divides alpha by n, so we pass ``alpha * n`` to get the
    paper's formula.
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
                 init: str = "paper", image_size: int = 224):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        w = scaled_widths(width)
        self.num_classes, self.width, self.widths, self.image_size = num_classes, width, w, image_size
        side = feature_map_size(image_size)
        g = COLUMNS
        self.conv1 = nn.Conv2d(3, w["conv1"], kernel_size=11, stride=4, padding=2)
        self.conv2 = nn.Conv2d(w["conv1"], w["conv2"], kernel_size=5, padding=2, groups=g)
        self.conv3 = nn.Conv2d(w["conv2"], w["conv3"], kernel_size=3, padding=1)  # sees both columns
        self.conv4 = nn.Conv2d(w["conv3"], w["conv4"], kernel_size=3, padding=1, groups=g)
        self.conv5 = nn.Conv2d(w["conv4"], w["conv5"], kernel_size=3, padding=1, groups=g)
        self.fc6 = nn.Linear(w["conv5"] * side * side, w["fc6"])  # sees both columns
        self.fc7 = nn.Linear(w["fc6"], w["fc7"])             # sees both columns
        self.fc8 = nn.Linear(w["fc7"], num_classes)
        self.lrn = ColumnLRN(g)
        self.pool = nn.MaxPool2d(POOL_SIZE, POOL_STRIDE)
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
                    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(layer.bias)

    def learned_layers(self):
        return [(n, getattr(self, n)) for n in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.lrn(F.relu(self.conv1(x))))   # conv1 -> ReLU -> LRN -> overlapping max-pool
        x = self.pool(self.lrn(F.relu(self.conv2(x))))   # conv2 -> ReLU -> LRN -> overlapping max-pool
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = self.pool(F.relu(self.conv5(x)))             # conv5 -> ReLU -> overlapping max-pool
        return x

    def classifier(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc6(x)))            # dropout on the *outputs* of fc6 and fc7
        x = self.dropout(F.relu(self.fc7(x)))
        return self.fc8(x)                               # logits; softmax is in the loss / at eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

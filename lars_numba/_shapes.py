"""Parameter shapes of real networks, for benchmarks and the performance notes."""

from __future__ import annotations


def _resnet50_shapes() -> tuple[tuple[int, ...], ...]:
    """The parameters of torchvision's ``resnet50()``, in its order.

    Bottleneck blocks (1x1, 3x3, 1x1 convolutions without bias, each followed
    by a batch normalization with a gamma and a beta), a 1x1 projection with
    its own batch normalization on the first block of each stage, and a fully
    connected layer with bias. Chainer's ``ResNet50Layers`` has the same
    arrays plus a bias of 64 on the first convolution.
    """
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out_channels = 4 * width
            for conv in (
                (width, in_channels, 1, 1),
                (width, width, 3, 3),
                (out_channels, width, 1, 1),
            ):
                shapes += [conv, conv[:1], conv[:1]]
            if block == 0:
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    shapes += [(1000, 2048), (1000,)]
    return tuple(shapes)


#: The 161 parameter shapes of ResNet-50 (torchvision), 25,557,032 elements.
RESNET50_SHAPES = _resnet50_shapes()

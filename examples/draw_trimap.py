"""Draw the demo's sky trimap for tubingen.jpg: white = sky, black = town, grey = unknown.

Run once by hand on the full-size photo (1024x768; examples/tubingen.jpg is a smaller copy of
it, and the trimap is resized to whatever image it is used with); its output,
examples/tubingen_trimap.png, is committed:

    python examples/draw_trimap.py /work/shared/images/tubingen.jpg examples/tubingen_trimap.png

The sky is the clear blue connected to the top edge. A band along the skyline is left unknown so
that matting decides the edge, and wider where the bare tree on the left lets the sky through its
branches: there matting, not this heuristic, must separate twigs from sky.
"""

import argparse

import numpy as np
from PIL import Image
from scipy import ndimage

# Sky in this photo: blue well above red (measured: sky about (80-115, 130-150, 180-195), the
# bluish river and shadows have blue below 140).
MIN_BLUE, MIN_BLUE_OVER_RED = 140, 45
# Seen through the tree's twigs the sky is paler and greyer: a looser test, used only there.
TREE_MIN_BLUE, TREE_MIN_BLUE_OVER_RED = 110, 15
# Half-widths of the unknown band, in pixels at 1024x768: the skyline and the tree crown.
SKYLINE_BAND, TREE_BAND = 6, 12
# The bare tree's crown (x0, y0, x1, y1), where twigs and sky interleave.
TREE_BOX = (0, 0, 240, 400)


def sky_trimap(rgb: np.ndarray) -> np.ndarray:
    """uint8 trimap (H, W): 255 sky, 0 town, 128 unknown."""
    red, blue = rgb[..., 0].astype(int), rgb[..., 2].astype(int)
    bluish = (blue >= MIN_BLUE) & (blue - red >= MIN_BLUE_OVER_RED)
    # Only blue regions reaching the top edge are sky (the river reflects it lower down).
    components, _ = ndimage.label(bluish)
    top = np.setdiff1d(np.unique(components[0]), [0])
    sky = np.isin(components, top)
    # Thin dark specks inside the sky (antennas, birds) are sky for our purpose.
    sky |= ndimage.binary_closing(sky, iterations=2)

    x0, y0, x1, y1 = TREE_BOX
    in_tree = np.zeros_like(sky)
    in_tree[y0:y1, x0:x1] = True
    paler = (blue >= TREE_MIN_BLUE) & (blue - red >= TREE_MIN_BLUE_OVER_RED)
    maybe_sky = sky | ndimage.binary_dilation(in_tree & paler, iterations=TREE_BAND)

    trimap = np.full(sky.shape, 128, dtype=np.uint8)
    trimap[ndimage.binary_erosion(sky, iterations=SKYLINE_BAND, border_value=1)] = 255
    trimap[~ndimage.binary_dilation(maybe_sky, iterations=SKYLINE_BAND)] = 0
    return trimap


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("trimap")
    args = parser.parse_args()
    rgb = np.asarray(Image.open(args.image).convert("RGB"))
    Image.fromarray(sky_trimap(rgb)).save(args.trimap)


if __name__ == "__main__":
    main()

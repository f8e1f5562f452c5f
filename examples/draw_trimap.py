"""Draw a demo's sky trimap: white = sky, black = the rest, grey = unknown.

Run once by hand on the full-size photo (1024x768 for tubingen; examples/tubingen.jpg is a
smaller copy of it, and the trimap is resized to whatever image it is used with); its outputs
are committed:

    python examples/draw_trimap.py /work/shared/images/tubingen.jpg examples/tubingen_trimap.png
    python examples/draw_trimap.py /work/shared/images/hoovertowernight.jpg \
        examples/hoovertowernight_trimap.png --min-blue 90 --min-blue-over-red 40 --tree-box ""

The sky is the clear blue connected to the top edge. A band along the skyline is left unknown so
that matting decides the edge, and wider where the bare tree on the left lets the sky through its
branches: there matting, not this heuristic, must separate twigs from sky.
"""

import argparse

import numpy as np
from PIL import Image
from scipy import ndimage

# Sky in tubingen: blue well above red (measured: sky about (80-115, 130-150, 180-195), the
# bluish river and shadows have blue below 140). The night sky of hoovertowernight is darker
# (measured (2-56, 69-94, 103-148); the lit tower and arcades have blue below red).
MIN_BLUE, MIN_BLUE_OVER_RED = 140, 45
# Seen through the tree's twigs the sky is paler and greyer: a looser test, used only there.
TREE_MIN_BLUE, TREE_MIN_BLUE_OVER_RED = 110, 15
# Half-widths of the unknown band, in pixels at 1024x768: the skyline and the tree crown.
SKYLINE_BAND, TREE_BAND = 6, 12
# The bare tree's crown in tubingen (x0, y0, x1, y1), where twigs and sky interleave.
TREE_BOX = (0, 0, 240, 400)


def sky_trimap(
    rgb: np.ndarray,
    min_blue: int = MIN_BLUE,
    min_blue_over_red: int = MIN_BLUE_OVER_RED,
    tree_box: tuple[int, int, int, int] | None = TREE_BOX,
) -> np.ndarray:
    """uint8 trimap (H, W): 255 sky, 0 the rest, 128 unknown."""
    red, blue = rgb[..., 0].astype(int), rgb[..., 2].astype(int)
    bluish = (blue >= min_blue) & (blue - red >= min_blue_over_red)
    # Only blue regions reaching the top edge are sky (the river reflects it lower down).
    components, _ = ndimage.label(bluish)
    top = np.setdiff1d(np.unique(components[0]), [0])
    sky = np.isin(components, top)
    # Thin dark specks inside the sky (antennas, birds) are sky for our purpose.
    sky |= ndimage.binary_closing(sky, iterations=2)

    in_tree = np.zeros_like(sky)
    if tree_box is not None:
        x0, y0, x1, y1 = tree_box
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
    parser.add_argument("--min-blue", type=int, default=MIN_BLUE)
    parser.add_argument("--min-blue-over-red", type=int, default=MIN_BLUE_OVER_RED)
    parser.add_argument("--tree-box", default=",".join(map(str, TREE_BOX)),
                        help="x0,y0,x1,y1 of a bare tree's crown, or '' for none")  # fmt: skip
    args = parser.parse_args()
    rgb = np.asarray(Image.open(args.image).convert("RGB"))
    box = tuple(int(v) for v in args.tree_box.split(",")) if args.tree_box else None
    Image.fromarray(sky_trimap(rgb, args.min_blue, args.min_blue_over_red, box)).save(args.trimap)


if __name__ == "__main__":
    main()

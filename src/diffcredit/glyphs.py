"""Offline stand-in data for text-to-image models: letters rendered in the fonts that matplotlib ships, with captions.

A font plays the part of an artist: each contributor is one font file (a family and style of DejaVu), all contributors
draw the same letters, and a caption names only the letter ("the letter G"), so what a contributor adds is its style,
as an artist adds a style to prompts that name the subject. Fonts that no contributor owns (STIX, Computer Modern)
pre-train the stand-in base model, as LAION pre-trains Stable Diffusion before the artists' LoRA.

Every item is the letter drawn white on black at four times the image size and averaged over 4×4 blocks, with a small
seeded shift and scale per variant so that a contributor's items of one letter differ. Nothing is downloaded, and
the same fonts give the same pixels, so the config's ``data.source: glyphs`` (:func:`load_source`) renders the
contributors' items afresh in every process; ``python -m diffcredit.glyphs`` writes other sizes or variant counts to an
``.npz`` for ``data.source: npz``.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

from diffcredit.contributors import ContributorData

# contributor id -> font file in matplotlib's fonts/ttf folder (the Display cuts are for large sizes only)
CONTRIBUTOR_FONTS = {
    f"dejavu-{family.lower()}{'-' + style.lower() if style else ''}": f"DejaVu{family}{'-' + style if style else ''}.ttf"
    for family, styles in (
        ("Sans", ("", "Bold", "Oblique", "BoldOblique")),
        ("SansMono", ("", "Bold", "Oblique", "BoldOblique")),
        ("Serif", ("", "Bold", "Italic", "BoldItalic")),
    )
    for style in styles
}
# fonts for pre-training the stand-in base model: none is a contributor's
BASE_FONTS = {
    "stix": "STIXGeneral.ttf",
    "stix-bold": "STIXGeneralBol.ttf",
    "stix-italic": "STIXGeneralItalic.ttf",
    "stix-bolditalic": "STIXGeneralBolIta.ttf",
    "cm-roman": "cmr10.ttf",
    "cm-sans": "cmss10.ttf",
    "cm-typewriter": "cmtt10.ttf",
    "cm-italic": "cmti10.ttf",
}
LETTERS = string.ascii_uppercase
OVERSAMPLE = 4
# the ``glyphs`` data source: 16x16 items, two variants per letter and font, the variants' jitter drawn from seed 0
# (fixed, not the run's seed: the contributors' data is the same in every run)
SOURCE_SIZE, SOURCE_VARIANTS, SOURCE_SEED = 16, 2, 0


def caption(letter: str) -> str:
    """The prompt of an item: it names the letter, never the font."""
    return f"the letter {letter}"


def is_glyph_id(item) -> bool:
    """Whether ``item`` is named as :func:`load_glyphs` names a glyph: ``<font>-<letter><variant>``."""
    font, _, rest = str(item).rpartition("-")
    return bool(font) and rest[:1].isalpha() and rest[1:].isdigit()


def captions_of(item_ids) -> np.ndarray:
    """The captions of glyph items, read from their ids (see :func:`is_glyph_id`)."""
    letters = []
    for item in item_ids:
        if not is_glyph_id(item):
            raise ValueError(f"item id {item!r} is not a glyph's (<font>-<letter><variant>); give captions instead")
        letters.append(str(item).rpartition("-")[2][0])
    return np.array([caption(letter) for letter in letters])


def render(
    letter: str, font_file: str, size: int = 16, *, shift: tuple[float, float] = (0.0, 0.0), scale: float = 1.0
) -> np.ndarray:
    """One glyph as float32 ``[size, size]`` in ``[-1, 1]`` (ink +1); ``shift`` moves it by that share of the image."""
    from matplotlib import get_data_path
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties

    path = Path(get_data_path()) / "fonts" / "ttf" / font_file
    if not path.is_file():
        raise FileNotFoundError(f"font {path} not found; matplotlib ships DejaVu, STIX and cm fonts in that folder")
    pixels = size * OVERSAMPLE
    figure = Figure(figsize=(1, 1), dpi=pixels, facecolor="black")
    canvas = FigureCanvasAgg(figure)
    # 72 points fill the one-inch figure; 60 leaves a margin for ascenders and the shift
    figure.text(
        0.5 + shift[0],
        0.5 + shift[1],
        letter,
        color="white",
        ha="center",
        va="center",
        fontsize=60 * scale,
        fontproperties=FontProperties(fname=path),
    )
    canvas.draw()
    ink = np.asarray(canvas.buffer_rgba())[..., 0].astype(np.float64) / 255.0
    cells = ink.reshape(size, OVERSAMPLE, size, OVERSAMPLE).mean(axis=(1, 3))
    return (cells * 2.0 - 1.0).astype(np.float32)


def load_glyphs(
    fonts: dict[str, str] | None = None,
    *,
    letters: str = LETTERS,
    size: int = 16,
    variants: int = 2,
    seed: int = 0,
) -> tuple[ContributorData, np.ndarray]:
    """Every letter of ``letters`` in every font, ``variants`` times: the data and one caption per item.

    ``fonts`` maps contributor ids to font files (default :data:`CONTRIBUTOR_FONTS`; :data:`BASE_FONTS` for the base
    model's pre-training). Labels are letter indices; item ids are ``<font>-<letter><variant>``. The first variant is
    centred at full size; the others are shifted by up to 6% and scaled by 0.9-1.05, drawn from ``seed``.
    """
    fonts = CONTRIBUTOR_FONTS if fonts is None else fonts
    if not fonts or not letters or variants < 1:
        raise ValueError(f"need fonts, letters and variants >= 1, got {len(fonts)} fonts, {letters!r}, {variants}")
    rng = np.random.default_rng(seed)
    images, owners, item_ids, labels, captions = [], [], [], [], []
    for owner, font_file in fonts.items():
        for label, letter in enumerate(letters):
            for variant in range(variants):
                jitter = variant > 0
                shift = tuple(rng.uniform(-0.06, 0.06, 2)) if jitter else (0.0, 0.0)
                scale = rng.uniform(0.9, 1.05) if jitter else 1.0
                images.append(render(letter, font_file, size, shift=shift, scale=scale))
                owners.append(owner)
                item_ids.append(f"{owner}-{letter}{variant}")
                labels.append(label)
                captions.append(caption(letter))
    data = ContributorData(np.stack(images)[:, None], np.array(owners), np.array(item_ids), np.array(labels))
    return data, np.array(captions)


def load_source() -> ContributorData:
    """The ``glyphs`` data source: every letter in every contributor font (:data:`CONTRIBUTOR_FONTS`), rendered at
    :data:`SOURCE_SIZE` pixels with :data:`SOURCE_VARIANTS` variants; labels are the letters' indices."""
    return load_glyphs(size=SOURCE_SIZE, variants=SOURCE_VARIANTS, seed=SOURCE_SEED)[0]


def main(argv: list[str] | None = None) -> None:
    """``python -m diffcredit.glyphs OUT.npz``: write the contributors' glyphs at another size or variant count for
    ``data.source: npz`` (``data.source: glyphs`` renders the default ones itself)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m diffcredit.glyphs", description=main.__doc__)
    parser.add_argument("out", help="the .npz to write (images, contributors, item_ids, labels)")
    parser.add_argument("--size", type=int, default=SOURCE_SIZE, help="image side in pixels (default: %(default)s)")
    parser.add_argument(
        "--variants", type=int, default=SOURCE_VARIANTS, help="items per letter and font (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=SOURCE_SEED, help="seed of the variants' jitter (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    data, _ = load_glyphs(size=args.size, variants=args.variants, seed=args.seed)
    data.save(args.out)
    print(f"{args.out}: {len(data)} glyphs of {len(data.contributor_ids)} fonts, {args.size}x{args.size}")


if __name__ == "__main__":
    main()

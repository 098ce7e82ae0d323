"""``colorize app``: a web page to try the champion in a browser (Gradio), on 127.0.0.1 by default.

Upload one or several photos (grayscale or colour), optionally upscale small ones with Real-ESRGAN
first, follow the progress (which photo, which step), compare before and after on a slider (the first
photo, or any picked in the gallery), download the PNGs. It runs the same pipeline as ``colorize image``
(flows.colorize_images.PhotoColorizer: the network at its own size, the photo's own full-resolution L).
A file that is not an image gets a line in the page's status, and the server goes on. The page says
which model version it runs and that version's test metrics.

For a model trained with hints (``train.hints``, model.hints) the page has a hints panel: click the first
photo to place a colour point (the colour picker's colour, or one taken by clicking the reference photo),
upload a reference photo whose palette to follow, remove the last point or all, load a hints JSON, and
download the hinted PNG and the hints JSON (which ``colorize image --hints`` and the page read back).
Each change recolours the photo; a bad hint is a line in the panel and the server goes on.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flows.colorize_images import PhotoColorizer, model_summary, save
from model import hints as hinting
from model.choices import DEFAULT_VIVIDNESS, VIVIDNESS_RANGE
from model.loading import Running
from storage.images import ImageError, load_photo

Pair = tuple[np.ndarray, np.ndarray]  # (before, after) of one photo


def colorize_uploads(
    colorizer: PhotoColorizer,
    files: list[Any] | None,
    upscale: bool,
    out_dir: Path,
    progress: Callable[[float, str], None] | None = None,
    vividness: float | None = None,
) -> tuple[list[tuple[np.ndarray, str]], list[str], str, list[Pair]]:
    """(gallery of before/after images, PNG paths to download, a status line per file, the before/after
    pairs for the slider); ``progress(fraction, what)`` is told before each photo; ``vividness``: a
    classification model's decoding temperature for these photos (None: the model's)."""
    gallery: list[tuple[np.ndarray, str]] = []
    outputs: list[str] = []
    notes: list[str] = []
    pairs: list[Pair] = []
    files = files or []
    for i, f in enumerate(files):
        path = _upload_path(f)
        name = path.name
        if progress is not None:
            step = "upscaling (Real-ESRGAN), then colorizing" if upscale else "colorizing"
            progress(i / len(files), f"{step} {name} ({i + 1} of {len(files)})")
        try:
            before, after, alpha = colorizer.colorize_file(path, upscale, vividness)
        except (ImageError, OSError) as exc:
            notes.append(f"**{name}**: {str(exc).removeprefix(str(path) + ': ')}")
            continue
        dest = out_dir / f"{path.stem}_color.png"
        n = 2
        while dest.exists():
            dest = out_dir / f"{path.stem}_color-{n}.png"
            n += 1
        save(after, alpha, dest)
        gallery += [(before, f"{name}: before"), (after, f"{name}: after ({after.shape[1]}x{after.shape[0]})")]
        outputs.append(str(dest))
        pairs.append((before, after))
        notes.append(f"**{name}**: colorized, {after.shape[1]}x{after.shape[0]}")
    if not notes:
        notes.append("Choose one or more photos first.")
    return gallery, outputs, "\n\n".join(notes), pairs


MARK = 5  # the radius in px of a point's mark on the hint photo


def hint_modes(colorizer: PhotoColorizer) -> tuple[bool, bool]:
    """(whether the page shows the hints panel, whether it takes a reference photo)."""
    mode = getattr(colorizer.net.spec, "hints", "off")
    return mode != "off", mode == "local+global"


def marked(rgb: np.ndarray, points: list[dict[str, Any]]) -> np.ndarray:
    """The photo with each point drawn as a ring in its colour (white-edged, to show on any background)."""
    from PIL import ImageDraw

    img = Image.fromarray(rgb).convert("RGB")
    draw = ImageDraw.Draw(img)
    for p in points:
        x, y = p["x"], p["y"]
        draw.ellipse((x - MARK - 1, y - MARK - 1, x + MARK + 1, y + MARK + 1), outline="white", width=2)
        draw.ellipse((x - MARK, y - MARK, x + MARK, y + MARK), fill=p["color"], outline="black")
    return np.asarray(img)


def recolour(
    colorizer: PhotoColorizer,
    photo: str | None,
    points: list[dict[str, Any]],
    reference: np.ndarray | None,
    upscale: bool,
    out_dir: Path,
    vividness: float | None = None,
) -> tuple[np.ndarray | None, list[str] | None, str]:
    """(the hinted colour version of ``photo``, [its PNG, the hints JSON] to download, a status line) for
    the page's points (``{"x", "y", "color"}``, the photo's own pixels) and reference photo. A bad hint or
    a grey reference is the status line, the picture None."""
    if photo is None:
        return None, None, "Colorize a photo first: the points go on the first one."
    try:
        found = hinting.from_items(points, "points")
        palette = hinting.reference_hint(reference) if reference is not None else None
        guidance = hinting.Guidance(tuple(found), palette)
        _, after, alpha = colorizer.colorize_file(Path(photo), upscale, vividness, guidance=guidance or None)
    except (hinting.HintError, ImageError, OSError) as exc:
        return None, None, f"Hints: {exc}"
    stem = Path(photo).stem
    dest, doc = out_dir / f"{stem}_hinted.png", out_dir / f"{stem}_hints.json"
    save(after, alpha, dest)
    doc.write_text(hinting.to_json(found))
    said = f"{len(found)} point{'s' if len(found) != 1 else ''}" + (
        " and the reference's palette" if palette is not None else ""
    )
    return after, [str(dest), str(doc)], f"Hints: {said}."


def vividness_slider(colorizer: PhotoColorizer) -> tuple[bool, float]:
    """(whether the page shows a vividness slider: only a classification model has one, where it starts)."""
    spec = colorizer.net.spec
    classifies = getattr(spec, "head", "regression") == "classification"
    return classifies, getattr(colorizer.net, "temperature", getattr(spec, "temperature", DEFAULT_VIVIDNESS))


def build(colorizer: PhotoColorizer, summary: str, out_dir: Path) -> Any:
    # Imported here: serve() points GRADIO_TEMP_DIR at its own folder first. No postponed annotations in
    # this module: Gradio reads the handlers' annotations (gr.SelectData) as objects.
    import gradio as gr

    # analytics off in code too: Gradio's default phones huggingface.co and api.gradio.app at start
    with gr.Blocks(title="colorize", analytics_enabled=False) as page:
        gr.Markdown(f"# Colorize grayscale photos\n{summary}")
        with gr.Row():
            with gr.Column():
                files = gr.File(file_count="multiple", label="Photos (grayscale or colour)", elem_id="photos")
                upscale = gr.Checkbox(label="Upscale small photos first (Real-ESRGAN x4)", elem_id="upscale")
                shown, start = vividness_slider(colorizer)
                low, high = VIVIDNESS_RANGE
                vivid = gr.Slider(
                    low,
                    high,
                    value=start,
                    step=0.01,
                    label="Vividness: more to the right, more colour (the decoding temperature, 0.01 to 1)",
                    visible=shown,
                    elem_id="vividness",
                )
                go = gr.Button("Colorize", variant="primary", elem_id="go")
                status = gr.Markdown(elem_id="status")
            with gr.Column():
                slider = gr.ImageSlider(label="Before | after (drag the handle)", type="numpy", elem_id="slider")
                gallery = gr.Gallery(label="Before and after (pick one for the slider)", columns=2, elem_id="results")
                downloads = gr.File(label="Download (PNG)", file_count="multiple", elem_id="downloads")
        pairs = gr.State([])
        hinted, global_too = hint_modes(colorizer)
        with gr.Column(visible=hinted):
            gr.Markdown(
                "### Colour hints\nClick the photo to place a point of the chosen colour"
                + (
                    "; upload a reference photo to follow its palette, and click it to take a colour."
                    if global_too
                    else "."
                )
            )
            with gr.Row():
                with gr.Column():
                    hint_photo = gr.Image(
                        label="Click to place a point (the first photo)",
                        type="numpy",
                        interactive=False,
                        elem_id="hint-photo",
                    )
                    colour = gr.ColorPicker("#3366cc", label="Point colour", elem_id="hint-colour")
                    reference = gr.Image(
                        label="Reference photo (its palette)",
                        type="numpy",
                        sources=["upload"],
                        visible=global_too,
                        elem_id="reference",
                    )
                    with gr.Row():
                        undo = gr.Button("Remove the last point", elem_id="undo")
                        clear = gr.Button("Clear the points", elem_id="clear")
                    hints_file = gr.File(label="Load a hints JSON", file_types=[".json"], elem_id="hints-json")
                with gr.Column():
                    hinted_out = gr.Image(label="With the hints", type="numpy", interactive=False, elem_id="hinted")
                    hint_status = gr.Markdown(elem_id="hint-status")
                    hint_downloads = gr.File(
                        label="Download the hinted PNG and the hints JSON",
                        file_count="multiple",
                        elem_id="hint-downloads",
                    )
        photo_path = gr.State(None)
        points = gr.State([])

        def run(chosen: list[Any] | None, up: bool, t: float, progress: Any = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
            def tell(fraction: float, what: str) -> None:
                progress(fraction, desc=what)

            pictures, paths, text, done = colorize_uploads(
                colorizer, chosen, up, out_dir, tell, vividness=float(t) if shown else None
            )
            first = _first_photo(chosen)
            # a new photo starts without points (the last photo's could fall outside this one)
            return pictures, paths or None, text, done, (done[0] if done else None), first, _view(first, []), []

        def _view(photo: str | None, placed: list[dict[str, Any]]) -> np.ndarray | None:
            try:
                return marked(load_photo(photo).rgb, placed) if photo else None
            except (ImageError, OSError):
                return None

        def again(photo: str | None, placed: list[dict[str, Any]], ref: Any, up: bool, t: float) -> tuple[Any, ...]:
            after, files, line = recolour(colorizer, photo, placed, ref, up, out_dir, float(t) if shown else None)
            return placed, _view(photo, placed), after, files, line

        def place(
            photo: str | None,
            placed: list[dict[str, Any]],
            picked: str,
            ref: Any,
            up: bool,
            t: float,
            evt: gr.SelectData,
        ) -> tuple[Any, ...]:
            """A click on the hint photo: a point there, of the picker's colour."""
            placed = [*placed, {"x": int(evt.index[0]), "y": int(evt.index[1]), "color": _hex(picked)}]
            return again(photo, placed, ref, up, t)

        def take(ref: Any, evt: gr.SelectData) -> str:
            """A click on the reference photo: its colour there becomes the picker's."""
            r, g, b = (int(v) for v in np.asarray(ref)[int(evt.index[1]), int(evt.index[0]), :3])
            return f"#{r:02x}{g:02x}{b:02x}"

        def load_hints(doc: Any, photo: str | None, ref: Any, up: bool, t: float) -> tuple[Any, ...]:
            if doc is None:
                return again(photo, [], ref, up, t)
            path = _upload_path(doc)
            try:
                placed = [p.as_dict() for p in hinting.parse_json(path.read_bytes(), path.name)]
            except hinting.HintError as exc:
                return [], _view(photo, []), None, None, f"Hints: {exc}"
            return again(photo, placed, ref, up, t)

        def pick(done: list[Pair], evt: gr.SelectData) -> Any:
            """A gallery item (before or after of photo k) puts photo k on the slider."""
            return done[evt.index // 2] if done and evt.index is not None else None

        go.click(
            run, [files, upscale, vivid], [gallery, downloads, status, pairs, slider, photo_path, hint_photo, points]
        )
        gallery.select(pick, pairs, slider)
        shown_hints = [points, hint_photo, hinted_out, hint_downloads, hint_status]
        hint_photo.select(place, [photo_path, points, colour, reference, upscale, vivid], shown_hints)
        reference.select(take, reference, colour)
        reference.change(again, [photo_path, points, reference, upscale, vivid], shown_hints)
        undo.click(
            lambda p, pl, r, u, t: again(p, pl[:-1], r, u, t),
            [photo_path, points, reference, upscale, vivid],
            shown_hints,
        )
        clear.click(lambda p, r, u, t: again(p, [], r, u, t), [photo_path, reference, upscale, vivid], shown_hints)
        hints_file.upload(load_hints, [hints_file, photo_path, reference, upscale, vivid], shown_hints)
    return page


def _upload_path(f: Any) -> Path:
    """Where Gradio put an uploaded file (it gives a path, or an object with the path as ``name``)."""
    return Path(f if isinstance(f, str) else getattr(f, "name", f))


def _first_photo(chosen: list[Any] | None) -> str | None:
    """The first uploaded file's path (where the page's points go)."""
    return str(_upload_path(chosen[0])) if chosen else None


def _hex(picked: str) -> str:
    """The colour picker's value as #rrggbb (Gradio may give rgb(r, g, b) or #rgb)."""
    text = (picked or "").strip()
    if text.startswith("rgb"):
        r, g, b = (round(float(v)) for v in text[text.index("(") + 1 : text.index(")")].split(",")[:3])
        return f"#{r:02x}{g:02x}{b:02x}"
    if len(text) == 4 and text.startswith("#"):
        return "#" + "".join(c * 2 for c in text[1:])
    return text.lower()


def serve(
    workdir: Path,
    model: str | None,
    how: Running,
    host: str,
    port: int,
) -> int:
    """Run the page until Ctrl-C, SIGTERM or SIGHUP; its temporary folder (results and uploads) goes with it."""
    from flows.env import stop_on_signals
    from flows.ui import exposure_warning

    colorizer = PhotoColorizer.load(model, workdir, how)
    warning = exposure_warning(host, "the app")
    if warning:
        print(warning)
    stop_on_signals()
    out_dir = Path(tempfile.mkdtemp(prefix="colorize-app-"))
    # uploads go under it too (Gradio reads this when first imported), so nothing stays in /tmp/gradio
    os.environ.setdefault("GRADIO_TEMP_DIR", str(out_dir / "uploads"))
    try:
        page = build(colorizer, model_summary(model, workdir, colorizer), out_dir)
        print(f"colorize app: http://{host}:{port}  (Ctrl-C stops it)", flush=True)
        page.launch(server_name=host, server_port=port, allowed_paths=[str(out_dir)], show_error=True, quiet=True)
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


def demo_image() -> Image.Image:
    """A real photo for the README's screenshot and the browser test (scikit-image's coffee, grayscale)."""
    from skimage import data

    return Image.fromarray(data.coffee()).convert("L")

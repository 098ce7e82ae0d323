"""``colorize app``: a web page to try the champion in a browser (Gradio), on 127.0.0.1 by default.

Upload one or several photos (grayscale or colour), optionally upscale small ones with Real-ESRGAN
first, follow the progress (which photo, which step), compare before and after on a slider (the first
photo, or any picked in the gallery), download the PNGs. It runs the same pipeline as ``colorize image``
(flows.colorize_images.PhotoColorizer: the network at its own size, the photo's own full-resolution L).
A file that is not an image gets a line in the page's status, and the server goes on. The page says
which model version it runs and that version's test metrics.
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
from model.choices import DEFAULT_VIVIDNESS, VIVIDNESS_RANGE
from model.loading import Running
from storage.images import ImageError

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
        path = Path(f if isinstance(f, str) else getattr(f, "name", f))
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

        def run(chosen: list[Any] | None, up: bool, t: float, progress: Any = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
            def tell(fraction: float, what: str) -> None:
                progress(fraction, desc=what)

            pictures, paths, text, done = colorize_uploads(
                colorizer, chosen, up, out_dir, tell, vividness=float(t) if shown else None
            )
            return pictures, paths or None, text, done, (done[0] if done else None)

        def pick(done: list[Pair], evt: gr.SelectData) -> Any:
            """A gallery item (before or after of photo k) puts photo k on the slider."""
            return done[evt.index // 2] if done and evt.index is not None else None

        go.click(run, [files, upscale, vivid], [gallery, downloads, status, pairs, slider])
        gallery.select(pick, pairs, slider)
    return page


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

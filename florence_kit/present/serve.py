"""``florence-kit serve``: a local web page to try a checkpoint by hand, like the Florence-2 demos on the hub.

A person uploads a page, picks a task (one of ours, or one of Florence-2's own task tokens such as
``<OD>``), types a question, and reads the answer; for tasks that return regions the boxes are drawn
on the image. Gradio is an optional extra (``florence-kit[ui]``) and is told to stay offline: no
analytics, no version check, system fonts instead of web fonts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.tasks.spec import TaskSpec

# Florence-2's own prompts that a pretrained checkpoint answers; the ones taking text read it from the question box.
FLORENCE_TASKS = (
    "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OCR>", "<OCR_WITH_REGION>", "<OD>",
    "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>", "<CAPTION_TO_PHRASE_GROUNDING>", "<OPEN_VOCABULARY_DETECTION>",
    "<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>", "<REGION_TO_CATEGORY>",
    "<REGION_TO_DESCRIPTION>", "<REGION_TO_OCR>",
)
FLORENCE_TASKS_WITH_TEXT = {"<CAPTION_TO_PHRASE_GROUNDING>", "<OPEN_VOCABULARY_DETECTION>",
                            "<REFERRING_EXPRESSION_SEGMENTATION>"}
FLORENCE_TASKS_WITH_BOX = {"<REGION_TO_SEGMENTATION>", "<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>",
                           "<REGION_TO_OCR>"}  # the box field's x1,y1,x2,y2, written as <loc_*> tokens
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_SSR_MODE": "False"}


def require_gradio() -> Any:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import gradio
    except ImportError:
        raise UserError("`florence-kit serve` needs Gradio: pip install 'florence-kit[ui]'") from None
    return gradio


# ---------------------------------------------------------------------------------------------
# Answering


@dataclass
class Answer:
    text: str
    regions: Any | None  # the annotated image, when the task returns regions


class Predictor:
    """One loaded model answering the page's requests; tasks are ours by name or Florence-2's by token."""

    def __init__(self, model: Any, processor: Any, tasks: dict[str, TaskSpec], region_max_tokens: int = 256) -> None:
        self.model, self.processor, self.tasks = model, processor, tasks
        self.region_max_tokens = region_max_tokens  # Florence-2's own tasks: room for dozens of <loc_*> boxes
        self.region_types = {
            token: kind for token, kind in getattr(processor, "tasks_answer_post_processing_type", {}).items()
            if kind != "pure_text"
        }
        from florence_kit.common.geometry import ensure_parse_config  # tiny checkpoints lack a post-processing config

        ensure_parse_config(processor)

    def choices(self) -> list[str]:
        return [*self.tasks, *FLORENCE_TASKS]

    def prompt_for(self, choice: str, question: str, box: str = "",
                   size: tuple[int, int] = (1000, 1000)) -> tuple[str, dict[str, Any]]:
        """(prompt, generation settings) for a task name or a Florence-2 task token; ``box`` (x1,y1,x2,y2 pixels of
        an image of ``size``) fills a region-in prompt."""
        from florence_kit.common.geometry import box_prompt
        from florence_kit.evaluate.region_answers import parse_box_text, render_prompt

        question = (question or "").strip()
        if choice in self.tasks:
            spec = self.tasks[choice]
            return (render_prompt(spec, question or None, box, size, question_flag="a question",
                                  box_flag="a box (x1,y1,x2,y2)"), dict(spec.generation))
        if choice in FLORENCE_TASKS:
            if choice in FLORENCE_TASKS_WITH_TEXT and not question:
                raise UserError(f"{choice} needs a text input: type it in the question box")
            if choice in FLORENCE_TASKS_WITH_BOX:
                if not (box or "").strip():
                    raise UserError(f"{choice} needs a region: type x1,y1,x2,y2 (pixels) in the box field")
                return choice + box_prompt(parse_box_text(box, size, "the box"), size), {
                    "max_new_tokens": self.region_max_tokens}
            prompt = choice + (question if choice in FLORENCE_TASKS_WITH_TEXT else "")
            return prompt, {"max_new_tokens": self.region_max_tokens}
        raise UserError(f"unknown task '{choice}'; choose one of: {', '.join(self.choices())}")

    def __call__(self, image: Any, choice: str, question: str, box: str = "") -> Answer:
        """The answer ``predict`` and ``eval`` give for the same image, prompt and task (same decoding)."""
        from florence_kit.common.geometry import prompt_box
        from florence_kit.data.dataset import to_rgb
        from florence_kit.evaluate.generation import generate, generation_config
        from florence_kit.evaluate.region_answers import generate_raw, parse_answer, parse_box_text, task_token
        from florence_kit.present.draw import draw_regions

        if image is None:
            raise UserError("upload an image first")
        image = to_rgb(image)
        prompt, settings = self.prompt_for(choice, question, box, image.size)
        gen_config = generation_config(self.model, self.processor, settings)
        spec, token = self.tasks.get(choice), task_token(prompt)
        if (spec is not None and spec.regions) or (spec is None and token in self.region_types):
            text = generate_raw(self.model, self.processor, image, prompt, gen_config)  # keeps <loc_*>
            parsed = (parse_answer(spec, self.processor, text, image.size) if spec is not None
                      else self.processor.post_process_generation(text, task=token, image_size=image.size)[token])
            if isinstance(parsed, str):  # a region-in task's text: the box it was asked about, labelled with it
                return Answer(parsed, draw_regions(image, {"bboxes": [parse_box_text(box, image.size)],
                                                           "labels": [parsed]}))
            return Answer(json.dumps(parsed, ensure_ascii=False), draw_regions(image, parsed))
        text = generate(self.model, self.processor, [image], [prompt], gen_config)[0]
        if (box or "").strip() and prompt_box(prompt) is not None:  # Florence-2's own <REGION_TO_*> tokens
            return Answer(text, draw_regions(image, {"bboxes": [parse_box_text(box, image.size)], "labels": [text]}))
        return Answer(text, None)


# ---------------------------------------------------------------------------------------------
# The page


def build_app(predictor: Predictor, default: str, title: str) -> Any:
    """The Gradio page: image, task, question → answer (+ regions drawn). Its API name is ``/predict``."""
    gr = require_gradio()

    def answer(image: Any, choice: str, question: str, box: str | None = None) -> tuple[str, Any]:
        try:  # box defaults to None: API clients that send image, task and question only still work
            result = predictor(image, choice, question, box or "")
        except UserError as exc:
            raise gr.Error(str(exc)) from None
        return result.text, result.regions

    with gr.Blocks(title=f"florence-kit: {title}") as app:
        gr.Markdown(f"## florence-kit · {title}\nUpload a document image, pick a task, type a question.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="document image", sources=["upload", "clipboard"])
                task = gr.Dropdown(predictor.choices(), value=default, label="task")
                question = gr.Textbox(label="question", placeholder="What is the total?")
                box = gr.Textbox(label="box x1,y1,x2,y2 (pixels; for region-in tasks such as region-category)",
                                 placeholder="40,60,200,180")
                run = gr.Button("Answer", variant="primary")
            with gr.Column():
                text = gr.Textbox(label="answer", interactive=False)
                regions = gr.Image(type="pil", label="regions (boxes, polygons, the asked box)", interactive=False)
        run.click(answer, [image, task, question, box], [text, regions], api_name="predict")
        question.submit(answer, [image, task, question, box], [text, regions], api_visibility="private")
        box.submit(answer, [image, task, question, box], [text, regions], api_visibility="private")
    return app


def offline_theme(gr: Any) -> Any:
    """The default look with system fonts: the stock theme fetches its fonts from the web."""
    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def serve(model_path: str, task: str, host: str, port: int, tasks_dirs: list | None = None,
          print_fn: Any = print, attn: str = "auto") -> None:
    """Load the model, build the page and serve it until interrupted (``attn``: ``--attn``)."""
    from florence_kit.model.loading import load_for_generation
    from florence_kit.tasks.registry import all_tasks, get_task

    default = get_task(task, tasks_dirs or []).name  # an unknown --task fails before the model loads
    gr = require_gradio()
    tasks = dict(all_tasks(tasks_dirs or []))
    model, processor = load_for_generation(model_path, attn)
    app = build_app(Predictor(model, processor, tasks), default, str(model_path))
    print_fn(f"serving {model_path} on http://{host}:{port} (Ctrl+C stops)")
    try:
        app.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
                   quiet=True, theme=offline_theme(gr), footer_links=[])
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc}); choose another --port") from None

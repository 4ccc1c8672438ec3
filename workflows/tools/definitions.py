"""The example workflows, each declared once; ``build`` writes the UI and API files from these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODEL_FOLDER = "InternVL-U"
EXAMPLE_IMAGE = "example.png"  # ships in ComfyUI's input/ folder
CAPTION_FOLDER = "dataset"  # a folder of images the user puts in ComfyUI's input/ folder
QWEN_IMAGE_VAE = "qwen_image_vae.safetensors"
EXAMPLE_LORA = "internvlu_style.safetensors"  # an adapter in models/internvl_u_loras/ (train-lora writes them)  # ComfyUI's Qwen-Image VAE file, in models/vae/
SERVER_URL = "http://127.0.0.1:8091"  # where `internvl-u serve` listens by default
LOCAL_SETUP = (
    "Put the InternVL-U checkpoint folder in `ComfyUI/models/internvl_u/InternVL-U` "
    "(or pick another folder in the loader)."
)


@dataclass(frozen=True)
class Link:
    """An input fed by output ``slot`` of node ``node``."""

    node: int
    slot: int = 0


@dataclass
class Node:
    id: int
    type: str
    inputs: dict[str, Any] = field(default_factory=dict)
    title: str | None = None


@dataclass
class Workflow:
    name: str
    title: str
    description: str
    nodes: list[Node]
    setup: str = LOCAL_SETUP  # the note's last paragraph: what to do before queueing it


def _loader(node_id: int = 1) -> Node:
    return Node(
        node_id,
        "InternVLU_Loader",
        {
            "checkpoint": MODEL_FOLDER,
            "dtype": "auto",
            "device": "auto",
            "memory": "keep_loaded",
            "allow_download": False,
            "quantization": "none",
        },
    )


def _load_image(node_id: int, title: str = "Load Image") -> Node:
    return Node(node_id, "LoadImage", {"image": EXAMPLE_IMAGE}, title=title)


def _text_controls(max_new_tokens: int) -> dict[str, Any]:
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "num_beams": 1,
        "seed": 0,
    }


def _image_controls(width: int, height: int, seed: int, resolution: str) -> dict[str, Any]:
    return {
        "resolution": resolution,
        "width": width,
        "height": height,
        "steps": 20,
        "all_cfg_scale": 0.0,
        "part_cfg_scale": 0.0,
        "seed": seed,
        "batch_size": 1,
    }


def _save(node_id: int, source: int, prefix: str) -> Node:
    return Node(node_id, "SaveImage", {"images": Link(source), "filename_prefix": prefix})


IMAGE_QA = Workflow(
    "internvlu_image_qa",
    "InternVL-U: image question answering",
    "Ask a question about an image. The answer is shown on the Understand node.",
    [
        _loader(),
        _load_image(2),
        Node(
            3,
            "InternVLU_Understand",
            {
                "model": Link(1),
                "image": Link(2),
                "question": "Describe this image in detail.",
                **_text_controls(256),
                "per_image": False,
            },
        ),
    ],
)

MULTI_IMAGE = Workflow(
    "internvlu_multi_image_compare",
    "InternVL-U: compare several images",
    "Several images in one question: an IMAGE batch (here an image and its inverted copy, "
    "joined by Batch Images) is asked about as a whole. Images of different sizes can go "
    "to Understand's 'more_images' input instead.",
    [
        _loader(),
        _load_image(2),
        Node(3, "ImageInvert", {"image": Link(2)}),
        Node(4, "ImageBatch", {"image1": Link(2), "image2": Link(3)}),
        Node(
            5,
            "InternVLU_Understand",
            {
                "model": Link(1),
                "image": Link(4),
                "question": "These are two pictures. Tell me the difference between them.",
                **_text_controls(256),
                "per_image": False,
            },
        ),
    ],
)

TEXT_TO_IMAGE = Workflow(
    "internvlu_text_to_image",
    "InternVL-U: text to image",
    "Generate an image from a prompt.",
    [
        _loader(),
        Node(
            2,
            "InternVLU_Generate",
            {
                "model": Link(1),
                "prompt": "A red fox sitting in the snow under a pine tree, morning light",
                **_image_controls(1024, 1024, 42, "1:1 (1024x1024)"),
            },
        ),
        _save(3, 2, "InternVL-U/t2i"),
    ],
)

REASONING_TEXT_TO_IMAGE = Workflow(
    "internvlu_reasoning_text_to_image",
    "InternVL-U: reasoning-guided text to image",
    "The Reason node thinks about the prompt first; Generate draws guided by that chain of "
    "thought (the model's text_image mode). Generate's prompt is left empty, so it uses the "
    "prompt the reasoning was made for.",
    [
        _loader(),
        Node(
            2,
            "InternVLU_Reason",
            {
                "model": Link(1),
                "prompt": "Generate a picture that shows hope growing.",
                **_text_controls(200),
            },
        ),
        Node(
            3,
            "InternVLU_Generate",
            {
                "model": Link(1),
                "prompt": "",
                **_image_controls(1024, 1024, 42, "1:1 (1024x1024)"),
                "reasoning": Link(2, 0),
            },
        ),
        _save(4, 3, "InternVL-U/reasoning_t2i"),
    ],
)

EDIT = Workflow(
    "internvlu_edit",
    "InternVL-U: image editing",
    "Edit an image following an instruction. Width and height 0 keep the input's size.",
    [
        _loader(),
        _load_image(2),
        Node(
            3,
            "InternVLU_Edit",
            {
                "model": Link(1),
                "image": Link(2),
                "instruction": "Make the sky purple and add a glowing moon.",
                **_image_controls(0, 0, 123, "same as input"),
            },
        ),
        _save(4, 3, "InternVL-U/edit"),
    ],
)

REASONING_EDIT = Workflow(
    "internvlu_reasoning_edit",
    "InternVL-U: reasoning-guided editing",
    "The Reason node, given the same image, thinks about the edit first; Edit follows that "
    "chain of thought. Edit's instruction is left empty, so it uses the reasoning's.",
    [
        _loader(),
        _load_image(2),
        Node(
            3,
            "InternVLU_Reason",
            {
                "model": Link(1),
                "prompt": "Make this picture look like it was taken in winter.",
                **_text_controls(200),
                "image": Link(2),
            },
        ),
        Node(
            4,
            "InternVLU_Edit",
            {
                "model": Link(1),
                "image": Link(2),
                "instruction": "",
                **_image_controls(0, 0, 123, "same as input"),
                "reasoning": Link(3, 0),
            },
        ),
        _save(5, 4, "InternVL-U/reasoning_edit"),
    ],
)

DESCRIBE_THEN_EDIT = Workflow(
    "internvlu_describe_then_edit",
    "InternVL-U: describe, then edit",
    "Understand writes an edit instruction for the image; its answer is wired into Edit's instruction.",
    [
        _loader(),
        _load_image(2),
        Node(
            3,
            "InternVLU_Understand",
            {
                "model": Link(1),
                "image": Link(2),
                "question": "Suggest one short instruction that would make this picture more "
                "dramatic. Answer with the instruction only.",
                **_text_controls(64),
                "per_image": False,
            },
        ),
        Node(
            4,
            "InternVLU_Edit",
            {
                "model": Link(1),
                "image": Link(2),
                "instruction": Link(3, 0),
                **_image_controls(0, 0, 7, "same as input"),
            },
        ),
        _save(5, 4, "InternVL-U/describe_edit"),
    ],
)

CAPTION_FOLDER_WORKFLOW = Workflow(
    "internvlu_caption_folder",
    "InternVL-U: caption a folder of images",
    f"Captions every image of ComfyUI/input/{CAPTION_FOLDER} (one answer per image: Understand's "
    "per_image mode, images of equal size batched) and saves each as <name>.png with its caption in "
    "<name>.txt in ComfyUI/output/captions, the layout LoRA trainers read: `internvl-u train-lora --data "
    f"ComfyUI/output/captions --out ComfyUI/models/internvl_u_loras/{EXAMPLE_LORA}` turns it into an adapter for "
    "the InternVL-U LoRA node. The progress bar counts images; Cancel stops before anything is written.",
    [
        _loader(),
        Node(2, "InternVLU_LoadImageFolder", {"folder": CAPTION_FOLDER, "limit": 0}),
        Node(
            3,
            "InternVLU_Understand",
            {
                "model": Link(1),
                "image": Link(2, 0),
                "question": "Write a one-sentence caption of this image for a training dataset.",
                **_text_controls(96),
                "per_image": True,
            },
        ),
        Node(
            4,
            "InternVLU_SaveCaptions",
            {"images": Link(2, 0), "captions": Link(3, 0), "folder": "captions", "names": Link(2, 1)},
        ),
    ],
)

LATENT_TO_VAE_DECODE = Workflow(
    "internvlu_latent_vae_decode",
    "InternVL-U: latent to ComfyUI's VAE Decode",
    "Generate's 'latent' output is a native Qwen-Image VAE latent: ComfyUI's own VAE Decode (with "
    f"models/vae/{QWEN_IMAGE_VAE}) turns it into the same picture as Generate's 'images'. Core latent "
    "nodes (upscale, tiled decode) can sit in between.",
    [
        _loader(),
        Node(
            2,
            "InternVLU_Generate",
            {
                "model": Link(1),
                "prompt": "A lighthouse on a cliff at dusk, warm light in the windows",
                **_image_controls(1024, 1024, 42, "16:9 (1344x768)"),
            },
        ),
        Node(3, "VAELoader", {"vae_name": QWEN_IMAGE_VAE}),
        Node(4, "VAEDecode", {"samples": Link(2, 1), "vae": Link(3)}),
        _save(5, 4, "InternVL-U/vae_decode"),
        _save(6, 2, "InternVL-U/generate"),
    ],
)

REMOTE_SERVER = Workflow(
    "internvlu_remote_server",
    "InternVL-U: use a served model (internvl-u serve)",
    "The Remote Loader hands every InternVL-U node a model served by `internvl-u serve`, on this machine or "
    "a GPU box: no weights are loaded in ComfyUI. Here Reason plans a picture, Generate draws it, Understand "
    "describes it and Edit changes the example image, all on the server, with progress, previews and Cancel. "
    "Swap the Remote Loader in for the Loader of any workflow (the LATENT outputs are not available remotely).",
    [
        Node(1, "InternVLU_RemoteLoader", {"base_url": SERVER_URL, "api_key_env": "INTERNVL_U_API_KEY",
                                           "timeout": 600}),
        Node(2, "InternVLU_Reason", {"model": Link(1), "prompt": "A lighthouse on a cliff that shows hope.",
                                     **_text_controls(200)}),
        Node(
            3,
            "InternVLU_Generate",
            {"model": Link(1), "prompt": "", **_image_controls(1024, 1024, 42, "1:1 (1024x1024)"),
             "reasoning": Link(2, 0)},
        ),
        _save(4, 3, "InternVL-U/remote_t2i"),
        Node(
            5,
            "InternVLU_Understand",
            {"model": Link(1), "image": Link(3, 0), "question": "Describe this image in one sentence.",
             **_text_controls(64), "per_image": False},
        ),
        _load_image(6),
        Node(
            7,
            "InternVLU_Edit",
            {"model": Link(1), "image": Link(6), "instruction": "Make the sky purple and add a glowing moon.",
             **_image_controls(0, 0, 123, "same as input")},
        ),
        _save(8, 7, "InternVL-U/remote_edit"),
    ],
    setup=f"Start the server first, e.g. `internvl-u serve --model InternVL-U/InternVL-U --port 8091` (needs "
    f"`pip install -e \".[serve]\"`), and set the Remote Loader's base_url to it ({SERVER_URL} here). "
    "A server started with --api-key: set INTERNVL_U_API_KEY in ComfyUI's environment (the Remote Loader's "
    "api_key_env). ComfyUI's Python needs httpx.",
)

LORA_GENERATE = Workflow(
    "internvlu_lora_generate",
    "InternVL-U: text to image with a LoRA",
    "The LoRA node adds an adapter to the model for the nodes after it; the Loader's other branch still draws "
    "with the base model (same prompt and seed, for comparison). Chain LoRA nodes for several adapters, each "
    "with its own strength (0 gives the base image back exactly).",
    [
        _loader(),
        Node(2, "InternVLU_LoRA", {"model": Link(1), "lora_name": EXAMPLE_LORA, "strength": 1.0}),
        Node(
            3,
            "InternVLU_Generate",
            {
                "model": Link(2),
                "prompt": "A red fox sitting in the snow under a pine tree, morning light",
                **_image_controls(1024, 1024, 42, "1:1 (1024x1024)"),
            },
            title="Generate (with LoRA)",
        ),
        _save(4, 3, "InternVL-U/lora"),
        Node(
            5,
            "InternVLU_Generate",
            {
                "model": Link(1),
                "prompt": "A red fox sitting in the snow under a pine tree, morning light",
                **_image_controls(1024, 1024, 42, "1:1 (1024x1024)"),
            },
            title="Generate (base model)",
        ),
        _save(6, 5, "InternVL-U/base"),
    ],
    setup=f"{LOCAL_SETUP} Put an adapter in `ComfyUI/models/internvl_u_loras/` (or `models/loras/`), e.g. one "
    f"written by `internvl-u train-lora --data ComfyUI/output/captions --out "
    f"ComfyUI/models/internvl_u_loras/{EXAMPLE_LORA}` from the caption-folder workflow's output, and pick it in "
    "the LoRA node.",
)

WORKFLOWS = [
    IMAGE_QA,
    MULTI_IMAGE,
    TEXT_TO_IMAGE,
    REASONING_TEXT_TO_IMAGE,
    EDIT,
    REASONING_EDIT,
    DESCRIBE_THEN_EDIT,
    CAPTION_FOLDER_WORKFLOW,
    LATENT_TO_VAE_DECODE,
    REMOTE_SERVER,
    LORA_GENERATE,
]

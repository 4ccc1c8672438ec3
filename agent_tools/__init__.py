"""LangChain tools for InternVL-U: understand, reason about, generate and edit images.

```python
from agent_tools import InternVLUToolkit

toolkit = InternVLUToolkit(model="path/to/checkpoint", output_dir="outputs", allowed_dirs=["inputs"])
tools = toolkit.get_tools()  # understand_image, reason, generate_image, edit_image
```
"""

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # say which extra brings it, like the servers do
    raise ModuleNotFoundError(
        'agent_tools needs LangChain; install the [agents] extra: pip install -e ".[agents]" in your clone, '
        'or pip install "langchain-core>=1.0,<2"',
        name=exc.name,
    ) from exc

from agent_tools.base import InternVLUTool
from agent_tools.images import ImageStore, LoadedImage, StoredImage
from agent_tools.progress import PROGRESS_EVENT
from agent_tools.session import InternVLUSession, ToolLimits
from agent_tools.toolkit import InternVLUToolkit
from agent_tools.tools import EditImageTool, GenerateImageTool, ReasonTool, UnderstandImageTool

__all__ = [
    "PROGRESS_EVENT",
    "EditImageTool",
    "GenerateImageTool",
    "ImageStore",
    "InternVLUSession",
    "InternVLUTool",
    "InternVLUToolkit",
    "LoadedImage",
    "ReasonTool",
    "StoredImage",
    "ToolLimits",
    "UnderstandImageTool",
]

"""LangChain tools for InternVL-U: understand, reason about, generate and edit images.

```python
from agent_tools import InternVLUToolkit

toolkit = InternVLUToolkit(model="path/to/checkpoint", output_dir="outputs", allowed_dirs=["inputs"])
tools = toolkit.get_tools()  # understand_image, reason, generate_image, edit_image
```
"""

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

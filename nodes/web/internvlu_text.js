// Shows the text answer / chain of thought of the InternVL-U nodes on the node itself.
// Uses only the app object and the node's addDOMWidget (public in every frontend since 1.x);
// no import of frontend-internal modules such as scripts/widgets.js.
import { app } from "../../scripts/app.js";

const NODES_WITH_TEXT = new Set([
  "InternVLU_Understand",
  "InternVLU_Reason",
  "InternVLU_Unload",
  "InternVLU_LoadImageFolder",
  "InternVLU_SaveCaptions",
]);
const WIDGET_NAME = "internvlu_output_text";

function showText(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) {
    const area = document.createElement("textarea");
    area.readOnly = true;
    area.style.opacity = 0.85;
    area.style.width = "100%";
    widget = node.addDOMWidget(WIDGET_NAME, "internvlu_text", area, {
      getValue: () => area.value,
      setValue: (value) => {
        area.value = value;
      },
      serialize: false, // never stored in the workflow's widgets_values
    });
    widget.serialize = false;
  }
  widget.value = text;
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "InternVLU.ShowText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES_WITH_TEXT.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showText(this, message.text.join("\n"));
    };
  },
});

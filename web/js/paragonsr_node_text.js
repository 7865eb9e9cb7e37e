// Shows the text a ParagonSR node returns (summary, written path and verification report, PSNR
// report) on the node itself: stock ComfyUI has no node that displays text, and without this
// the user would have to wire one in to see what the node did.
import { app } from "../../scripts/app.js";

const WIDGET = "paragonsr_report";

app.registerExtension({
  name: "paragonsr.nodeText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("ParagonSR")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text?.join("\n");
      if (!text) return;
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        const area = document.createElement("textarea");
        area.readOnly = true;
        area.style.cssText =
          "width:100%;height:100%;resize:none;font:11px monospace;" +
          "background:transparent;color:inherit;border:none;white-space:pre-wrap";
        widget = this.addDOMWidget(WIDGET, "paragonsr_text", area, {
          getValue: () => area.value,
          setValue: (value) => {
            area.value = value;
          },
        });
        widget.serialize = false; // shown, never saved into the workflow or sent as an input
      }
      widget.element.value = text;
      const lines = text.split("\n").length;
      this.setSize([this.size[0], this.computeSize()[1] + 14 * lines]); // keep the width: neighbours stay clear
      app.graph.setDirtyCanvas(true, true);
    };
  },
});

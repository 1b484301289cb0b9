// Load Reference Pose shows the chosen pose, so the pick is visible before any run.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { widgetValue } from "./lib/concepts.js";
import { el } from "./lib/dom.js";
import { poseUrl } from "./lib/image_source.js";
import { REFERENCE_POSE } from "./lib/names.js";

function setUpPreview(node) {
  const image = el("img", { draggable: false, style: { width: "100%", height: "100%", objectFit: "contain",
    background: "#000", borderRadius: "4px", display: "block" } });
  const widget = node.addDOMWidget("pose_preview", "mixofshow_pose_preview", image, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 140,
  });
  widget.serialize = false;
  const show = () => {
    const pose = widgetValue(node, "pose");
    if (pose) image.src = poseUrl(api, pose);
    image.alt = pose ?? "";
  };
  const poseWidget = node.widgets.find((w) => w.name === "pose");
  const callback = poseWidget?.callback;
  if (poseWidget) {
    poseWidget.callback = function () {
      const result = callback?.apply(this, arguments);
      show();
      return result;
    };
  }
  node.setSize([Math.max(node.size[0], 300), Math.max(node.size[1], 220)]);
  setTimeout(show); // after a workflow load has set the value
}

app.registerExtension({
  name: "mixofshow.referencePose",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== REFERENCE_POSE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      setUpPreview(this);
      return result;
    };
  },
});

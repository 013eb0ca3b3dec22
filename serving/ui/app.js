// The restoray web UI: no framework, no CDN. Sends the form to POST /v1/jobs, follows the job's steps, shows
// the result over the input with a before/after slider.
"use strict";
const $ = (id) => document.getElementById(id);
let image = null;
let job = null;

function token() { return localStorage.getItem("restoray-token") || ""; }
function headers() { return token() ? { Authorization: "Bearer " + token() } : {}; }
function status(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }

async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options, { headers: Object.assign(headers(), (options || {}).headers || {}) }));
  if (response.status === 401 || response.status === 403) { $("auth").hidden = false; }
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(response.status + ": " + message);
  }
  return response;
}

async function loadOptions() {
  try {
    const options = await (await api("/v1/options")).json();
    $("auth").hidden = true;
    for (const [name, description] of Object.entries(options.samplers)) {
      const option = new Option(name, name); option.title = description; $("sampler").add(option);
    }
    $("phrases").replaceChildren(...options.restoration_prompts.map((phrase) => {
      const button = document.createElement("button"); button.type = "button"; button.textContent = phrase;
      button.onclick = () => {
        const field = $("restoration-prompt");
        field.value = field.value && phrase !== "Remove all degradation" ? field.value + "; " + phrase : phrase;
      };
      return button;
    }));
    if (!options.retrieval) { $("references").querySelector("option[value=auto]").disabled = true; }
    $("steps").max = options.limits.max_steps;
    const models = await (await api("/v1/models")).json();
    $("model").textContent = "model: " + models.default;
  } catch (error) { status(error.message, true); }
}

function setImage(file) {
  if (!file) return;
  image = file;
  $("before").src = URL.createObjectURL(file);
  $("restore").disabled = false;
  status(file.name + " (" + Math.round(file.size / 1024) + " KiB)");
}

function form() {
  const data = new FormData();
  data.append("image", image);
  const fields = { prompt: $("prompt").value, restoration_prompt: $("restoration-prompt").value, sampler: $("sampler").value,
    steps: $("steps").value, tau_r: $("tau-r").value, upscale: $("upscale").value, seed: $("seed").value };
  for (const [name, value] of Object.entries(fields)) { if (value !== "") data.append(name, value); }
  const mode = $("references").value;
  if (mode === "upload") { for (const file of $("reference-files").files) data.append("reference", file); }
  else data.append("references", mode);
  return data;
}

async function restore() {
  $("restore").disabled = true; $("cancel").hidden = false; $("progress").value = 0;
  try {
    const started = await (await api("/v1/jobs", { method: "POST", body: form() })).json();
    job = started.id;
    status("queued");
    let state = started;
    while (!["done", "failed", "cancelled"].includes(state.state)) {
      await new Promise((resolve) => setTimeout(resolve, 250));
      state = await (await api("/v1/jobs/" + job)).json();
      $("progress").max = state.total || 1; $("progress").value = state.step;
      status(state.state + (state.state === "restoring" ? " " + state.step + "/" + state.total : ""));
    }
    if (state.state !== "done") throw new Error(state.state + (state.error ? ": " + state.error.message : ""));
    show(await (await api("/v1/jobs/" + job + "/result", { headers: { Accept: "application/json" } })).json());
  } catch (error) { status(error.message, true); }
  finally { $("restore").disabled = !image; $("cancel").hidden = true; job = null; }
}

function show(result) {
  const url = "data:image/" + result.format + ";base64," + result.image;
  $("after").src = url;
  $("download").href = url; $("download").download = "restored." + (result.format === "jpeg" ? "jpg" : result.format);
  $("details").textContent = result.width + "x" + result.height + ", seed " + result.seed + ", model " + result.model.uri +
    " (" + result.model.version + "), caption: " + result.caption;
  const figures = [];
  if (result.retrieval) {
    for (const candidate of result.retrieval.candidates) {
      const figure = document.createElement("figure");
      const picture = document.createElement("img"); picture.src = "data:image/jpeg;base64," + candidate.thumbnail;
      const caption = document.createElement("figcaption");
      caption.textContent = candidate.source.split("/").pop() + " (" + candidate.similarity.toFixed(3) + ")" +
        (candidate.similarity >= result.retrieval.min_similarity ? "" : " not used");
      figure.append(picture, caption); figures.push(figure);
    }
    if (result.retrieval.fell_back) status("done: no reference reached " + result.retrieval.min_similarity + "; restored without one");
  }
  $("retrieved").replaceChildren(...figures);
  $("result").hidden = false;
  if (!result.retrieval || !result.retrieval.fell_back) status("done in " + result.seconds.total.toFixed(2) + " s");
  slide();
}

function slide() { $("after-clip").style.clipPath = "inset(0 0 0 " + $("slider").value + "%)"; }

$("file").onchange = (event) => setImage(event.target.files[0]);
$("drop").ondragover = (event) => { event.preventDefault(); $("drop").classList.add("over"); };
$("drop").ondragleave = () => $("drop").classList.remove("over");
$("drop").ondrop = (event) => { event.preventDefault(); $("drop").classList.remove("over"); setImage(event.dataTransfer.files[0]); };
$("references").onchange = () => { $("reference-files").hidden = $("references").value !== "upload"; };
$("restore").onclick = restore;
$("cancel").onclick = () => { if (job) api("/v1/jobs/" + job, { method: "DELETE" }).catch((error) => status(error.message, true)); };
$("slider").oninput = slide;
$("save-token").onclick = () => { localStorage.setItem("restoray-token", $("token").value.trim()); loadOptions(); };
loadOptions();

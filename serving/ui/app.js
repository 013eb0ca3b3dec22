// The restoray web UI: no framework, no CDN. Sends the form to POST /v1/jobs, follows the job's server-sent
// events (GET /v1/jobs/{id}/events, read with fetch: EventSource cannot send the bearer token; a dropped stream is
// resumed with Last-Event-ID), shows the result over the input with a before/after slider.
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
    $("cfg").max = options.limits.max_cfg;
    $("model-name").replaceChildren(...options.models.map((name) => new Option(name, name, name === "default", name === "default")));
    $("output-format").replaceChildren(...options.output_formats.map((format) => new Option(format, format)));
    const models = await (await api("/v1/models")).json();
    const served = models.models.find((model) => model.name === models.default);
    $("model").textContent = "model: " + models.default + (served && served.version ? " (" + served.version + ")" : "");
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
    steps: $("steps").value, tau_r: $("tau-r").value, upscale: $("upscale").value, seed: $("seed").value,
    model: $("model-name").value, cfg: $("cfg").value, experts: $("experts").value.trim(), output_format: $("output-format").value };
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
    const state = await follow(job, started);
    if (state.state !== "done") throw new Error(state.state + (state.error ? ": " + state.error.message : ""));
    show(await (await api("/v1/jobs/" + job + "/result", { headers: { Accept: "application/json" } })).json());
  } catch (error) { status(error.message, true); }
  finally { $("restore").disabled = !image; $("cancel").hidden = true; job = null; }
}

const FINISHED = ["done", "failed", "cancelled"];

function showState(state) {
  $("progress").max = state.total || 1; $("progress").value = state.step;
  status(state.state + (state.state === "restoring" ? " " + state.step + "/" + state.total : ""));
}

// Follow a job's events until it is over; a stream that ends early (the service's request timeout, a dropped
// connection) is resumed from the last event id.
async function follow(id, state) {
  let last = "";
  while (!FINISHED.includes(state.state)) {
    const extra = last ? { "Last-Event-ID": last } : {};
    const response = await api("/v1/jobs/" + id + "/events", { headers: Object.assign({ Accept: "text/event-stream" }, extra) });
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end); buffer = buffer.slice(end + 2);
        let data = "";
        for (const line of event.split("\n")) {
          if (line.startsWith("id:")) last = line.slice(3).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        if (data) { state = JSON.parse(data); showState(state); }
      }
    }
  }
  return state;
}

function show(result) {
  const url = "data:image/" + result.format + ";base64," + result.image;
  $("after").src = url;
  $("download").href = url; $("download").download = "restored." + (result.format === "jpeg" ? "jpg" : result.format);
  $("details").textContent = result.width + "x" + result.height + ", seed " + result.seed + ", model " + result.model.name +
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

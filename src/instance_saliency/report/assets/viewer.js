// instance-saliency report viewer: NiiVue (bundled, inlined gzip+base64) on embedded volumes.
// Everything it reads is in the page: no request leaves it (the report opens from disk).
// State for scripts and tests: window.isvViewer = {ready, error, loaded, selected, nv, ...}.
(function () {
  "use strict";
  const state = { ready: false, error: null, loaded: [], selected: null, method: null,
                  channel: null, background: null, vmax: null, nv: null };
  window.isvViewer = state;
  const $ = (id) => document.getElementById(id);
  const data = JSON.parse($("isv-data").textContent);
  const statusBox = $("isv-status");
  const say = (t) => { statusBox.textContent = t; };
  const METHOD_LABEL = { smoothgrad: "SmoothGrad", gradcampp: "Grad-CAM++", hirescam: "HiResCAM" };
  const lesionByLabel = new Map(data.lesions.map((l) => [String(l.label), l]));

  async function loadNiivue() {
    if (window.niivue) return;
    const b64 = $("isv-niivue").textContent.trim();
    const bin = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const stream = new Blob([bin]).stream().pipeThrough(new DecompressionStream("gzip"));
    const text = await new Response(stream).text();
    const s = document.createElement("script");
    s.textContent = text;
    document.head.appendChild(s);
    if (!window.niivue) throw new Error("the bundled NiiVue did not load");
  }

  // diverging map centred on 0 (like the PNG figures' RdBu_r): reds above +floor, blues below -floor
  // (entry 0, alpha 0: values at or below the floor stay transparent)
  const POS = { R: [0, 250, 214, 178, 103], G: [0, 170, 96, 24, 0], B: [0, 140, 77, 43, 13],
                A: [0, 255, 255, 255, 255], I: [0, 1, 85, 170, 255] };
  const NEG = { R: [0, 146, 67, 33, 5], G: [0, 197, 147, 102, 48], B: [0, 222, 195, 172, 97],
                A: [0, 255, 255, 255, 255], I: [0, 1, 85, 170, 255] };
  const FLOOR = 0.05;  // |s| below FLOOR * vmax is transparent, as in the figures

  let nv = null;
  const bgVols = {};
  let outlineVol = null;
  let overlay = null;

  async function vol(b64, name, opts) {
    return niivue.NVImage.loadFromBase64(Object.assign({ base64: b64, name: name }, opts));
  }

  function setVolumes(list) {
    for (const v of nv.volumes.slice()) nv.removeVolume(v);
    for (const v of list) if (v) nv.addVolume(v);
    state.loaded = nv.volumes.map((v) => v.name);
    nv.updateGLVolume();
  }

  // background, then the saliency overlay, then the lesion outlines on top
  function current() {
    return [bgVols[state.background], overlay, $("isv-outlines").checked ? outlineVol : null];
  }

  function fillChannels() {
    const sel = $("isv-channel");
    const cam = state.method !== "smoothgrad";  // CAM methods: one map at the layer
    const chans = cam ? ["CAM"] : data.channels;
    sel.innerHTML = "";
    for (const c of chans) {
      const o = document.createElement("option");
      o.value = c; o.textContent = c + (cam ? "" : " saliency");
      sel.appendChild(o);
    }
    if (!chans.includes(state.channel)) state.channel = chans[0];
    sel.value = state.channel;
  }

  async function loadOverlay() {
    overlay = null;
    state.vmax = null;
    const entry = (data.maps[String(state.selected)] || {})[state.method];
    const lesion = lesionByLabel.get(String(state.selected));
    const what = lesion ? `lesion ${lesion.label} (${lesion.status}, ${lesion.voxels} voxels)` : "";
    if (!entry || !entry.channels[state.channel]) {
      setVolumes(current());
      say(`${what}: no ${METHOD_LABEL[state.method] || state.method} map`);
      return;
    }
    const v = entry.vmax > 0 ? entry.vmax : 1;
    const signed = state.method === "smoothgrad";
    overlay = await vol(entry.channels[state.channel],
      `lesion_${state.selected}_${state.method}_${state.channel}.nii.gz`,
      { colormap: "isv_pos", colormapNegative: signed ? "isv_neg" : "",
        cal_min: FLOOR * v, cal_max: v, opacity: 0.85, trustCalMinMax: true });
    setVolumes(current());
    state.vmax = entry.vmax;
    const scale = signed ? `−${v.toPrecision(3)} … +${v.toPrecision(3)}` : `0 … ${v.toPrecision(3)}`;
    say(`${what}: ${METHOD_LABEL[state.method]}, ${state.channel}` +
        `${signed ? " saliency" : ""}; colour scale ${scale} ${data.units} (this lesion's own ` +
        `scale; |value| < ${FLOOR * 100}% of it not coloured)`);
  }

  const ZOOM = 2.5;  // 2D views magnified around the selected lesion (scroll to change)

  function moveTo(label) {
    const l = lesionByLabel.get(String(label));
    if (!l || !l.centroid_mm) return;
    nv.scene.crosshairPos = nv.mm2frac(l.centroid_mm);
    // zoom about the lesion: the pan NiiVue's own wheel zoom applies to keep the crosshair
    // in place, from the unzoomed view (pan 0, zoom 1)
    const c = l.centroid_mm;
    nv.setPan2Dxyzmm([(1 - ZOOM) * c[0], (1 - ZOOM) * c[1], (1 - ZOOM) * c[2], ZOOM]);
    nv.updateGLVolume();
  }

  async function select(label) {
    state.selected = String(label);
    for (const tr of document.querySelectorAll("#isv-table tbody tr")) {
      tr.classList.toggle("isv-selected", tr.dataset.label === state.selected);
    }
    await loadOverlay();
    moveTo(label);
  }

  // the crosshair in mm and on the canvas (CSS pixels from the canvas' top left), for tests
  state.crosshairMM = () => Array.from(nv.frac2mm(nv.scene.crosshairPos)).slice(0, 3);
  state.crosshairCanvas = () => {
    const p = nv.frac2canvasPos(nv.scene.crosshairPos);
    if (!p) return null;
    const r = window.devicePixelRatio || 1;
    return [p[0] / r, p[1] / r];
  };
  state.select = (label) => select(label);

  function sortable() {
    const table = $("isv-table");
    table.querySelectorAll("th").forEach((th, col) => {
      th.addEventListener("click", () => {
        const asc = th.dataset.dir !== "asc";
        table.querySelectorAll("th").forEach((h) => { delete h.dataset.dir; });
        th.dataset.dir = asc ? "asc" : "desc";
        const body = table.tBodies[0];
        const rows = Array.from(body.rows);
        const key = (tr) => {
          const c = tr.cells[col];
          const v = c.dataset.sort !== undefined ? c.dataset.sort : c.textContent;
          const n = parseFloat(v);
          return Number.isNaN(n) ? v : n;
        };
        rows.sort((a, b) => {
          const x = key(a), y = key(b);
          const cmp = typeof x === "number" && typeof y === "number" ? x - y
            : String(x).localeCompare(String(y));
          return asc ? cmp : -cmp;
        });
        for (const tr of rows) body.appendChild(tr);
      });
    });
    table.tBodies[0].addEventListener("click", (ev) => {
      const tr = ev.target.closest("tr");
      if (tr && tr.dataset.label) select(tr.dataset.label).catch(fail);
    });
  }

  function fail(e) {
    state.error = String(e && e.message ? e.message : e);
    say("viewer unavailable: " + state.error + " (the figures below still show every lesion)");
  }

  async function main() {
    sortable();
    const canvas = $("isv-canvas");
    if (!canvas.getContext("webgl2")) {
      throw new Error("this browser has no WebGL2");
    }
    await loadNiivue();
    nv = new niivue.Niivue({ isColorbar: true, show3Dcrosshair: false, backColor: [0, 0, 0, 1],
                             crosshairColor: [1, 1, 1, 0.7], crosshairWidth: 0.25,
                             multiplanarShowRender: 0, multiplanarLayout: 2,  // 2x2 grid
                             loadingText: "", dragAndDropEnabled: false,
                             isResizeCanvas: true, logLevel: "error" });
    state.nv = nv;
    await nv.attachTo("isv-canvas");
    nv.addColormap("isv_pos", POS);
    nv.addColormap("isv_neg", NEG);
    for (const c of data.channels) {
      bgVols[c] = await vol(data.backgrounds[c], `${c}.nii.gz`,
        { colormap: "gray", cal_min: 0, cal_max: 255, trustCalMinMax: true,
          colorbarVisible: false });
    }
    outlineVol = await vol(data.outline, "lesion_outlines.nii.gz",
      { colormap: "gray", opacity: 0.01, colorbarVisible: false });  // outline only (opaque border)
    outlineVol.setColormapLabel({ R: [0, 27, 217, 117, 102], G: [0, 158, 95, 112, 102],
      B: [0, 119, 2, 179, 102], A: [0, 255, 255, 255, 255], I: [0, 1, 2, 3, 4],
      labels: ["", "TP", "FP", "FN", "unknown"] });
    nv.setAtlasOutline(0.7);  // lesion borders drawn at 70 % opacity, insides clear
    state.background = data.channels[0];
    state.method = data.methods[0] || null;
    const bgSel = $("isv-background");
    for (const c of data.channels) {
      const o = document.createElement("option"); o.value = c; o.textContent = c; bgSel.appendChild(o);
    }
    const mSel = $("isv-method");
    for (const m of data.methods) {
      const o = document.createElement("option"); o.value = m; o.textContent = METHOD_LABEL[m] || m;
      mSel.appendChild(o);
    }
    fillChannels();
    bgSel.addEventListener("change", () => { state.background = bgSel.value; setVolumes(current()); });
    $("isv-outlines").addEventListener("change", () => setVolumes(current()));
    mSel.addEventListener("change", () => {
      state.method = mSel.value; fillChannels(); loadOverlay().catch(fail);
    });
    $("isv-channel").addEventListener("change", () => {
      state.channel = $("isv-channel").value; loadOverlay().catch(fail);
    });
    setVolumes(current());
    if (data.lesions.length) {
      await select(data.lesions[0].label);
    } else {
      say("no lesion instances");
    }
    state.ready = true;
  }

  main().catch(fail);
})();

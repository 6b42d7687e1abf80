// The loss chart: train and validation loss against the step, drawn as inline SVG.
//
// SVG rather than <canvas> because it is styled by the page's CSS (so it follows light/dark mode without a
// redraw), stays sharp at any zoom, and needs no chart library. The SVG is rebuilt from the data at most
// once per animation frame: a job's history arrives as a burst of events when the page subscribes, and
// drawing once per event would be wasted work.

const SVG = "http://www.w3.org/2000/svg";
const PAD = { left: 44, right: 12, top: 10, bottom: 26 };

function el(name, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

// About `count` round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart).
function ticks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

export class LossChart {
  constructor(container) {
    this.container = container;
    this.totalSteps = null;
    this.clear();
    // Redraw at the new width when the layout changes (rotating a phone, resizing a window), so text
    // keeps its size instead of being stretched by a fixed viewBox.
    new ResizeObserver(() => this.schedule()).observe(container);
  }

  clear() {
    this.train = []; // [step, loss]
    this.val = []; // [step, val_loss]
    this.schedule();
  }

  setTotalSteps(total) {
    this.totalSteps = total || null;
    this.schedule();
  }

  addTrain(step, loss) {
    if (Number.isFinite(step) && Number.isFinite(loss)) this.train.push([step, loss]);
    this.schedule();
  }

  addVal(step, loss) {
    if (Number.isFinite(step) && Number.isFinite(loss)) this.val.push([step, loss]);
    this.schedule();
  }

  // A resumed run starts again from its last checkpoint: records past that step are superseded.
  truncateAfter(step) {
    this.train = this.train.filter(([s]) => s <= step);
    this.val = this.val.filter(([s]) => s <= step);
    this.schedule();
  }

  schedule() {
    // Counts are published at once (tests and assistive tech read them); drawing waits for the next frame.
    this.container.dataset.trainPoints = String(this.train ? this.train.length : 0);
    this.container.dataset.valPoints = String(this.val ? this.val.length : 0);
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  draw() {
    const width = Math.max(200, this.container.clientWidth || 0);
    const height = Math.max(120, this.container.clientHeight || 0);
    const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-labelledby": "loss-chart-title" });
    svg.append(el("title", { id: "loss-chart-title" }, this.summary()));

    const points = [...this.train, ...this.val];
    if (points.length === 0) {
      svg.append(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" },
        "Waiting for the first loss values…"));
      this.container.replaceChildren(svg);
      return;
    }

    // Plain loops, not Math.max(...array): a long run has more points than a call may take arguments.
    let x1 = Math.max(this.totalSteps || 0, 1);
    let y0 = Infinity;
    let y1 = -Infinity;
    for (const [s, l] of points) {
      if (s > x1) x1 = s;
      if (l < y0) y0 = l;
      if (l > y1) y1 = l;
    }
    const x0 = 0;
    const margin = (y1 - y0) * 0.08 || Math.abs(y1) * 0.05 || 0.5;
    y0 -= margin;
    y1 += margin;

    const plotW = width - PAD.left - PAD.right;
    const plotH = height - PAD.top - PAD.bottom;
    const sx = (s) => PAD.left + ((s - x0) / (x1 - x0)) * plotW;
    const sy = (l) => PAD.top + (1 - (l - y0) / (y1 - y0)) * plotH;

    for (const t of ticks(y0, y1, 4)) {
      svg.append(el("line", { x1: PAD.left, x2: width - PAD.right, y1: sy(t), y2: sy(t), class: "grid" }));
      svg.append(el("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end", class: "axis-label" }, String(t)));
    }
    for (const t of ticks(x0, x1, Math.max(2, Math.floor(plotW / 90)))) {
      svg.append(el("text", { x: sx(t), y: height - 8, "text-anchor": "middle", class: "axis-label" }, String(t)));
    }

    svg.append(el("polyline", { points: this.path(this.thin(this.train, plotW), sx, sy), class: "line train" }));
    if (this.val.length) {
      svg.append(el("polyline", { points: this.path(this.val, sx, sy), class: "line val" }));
      for (const [s, l] of this.val.slice(-200)) svg.append(el("circle", { cx: sx(s), cy: sy(l), r: 3, class: "val" }));
    }
    this.container.replaceChildren(svg);
  }

  // Thousands of train points on a 600 px wide plot: keep about two per pixel (and always the last one).
  thin(points, plotW) {
    const keep = Math.max(2, Math.floor(plotW * 2));
    if (points.length <= keep) return points;
    const stride = points.length / keep;
    const out = [];
    for (let i = 0; i < keep; i++) out.push(points[Math.floor(i * stride)]);
    out.push(points[points.length - 1]);
    return out;
  }

  path(points, sx, sy) {
    return points.map(([s, l]) => `${sx(s).toFixed(1)},${sy(l).toFixed(1)}`).join(" ");
  }

  // What the chart shows, in words: the SVG's accessible name.
  summary() {
    const last = (a) => (a.length ? a[a.length - 1][1].toFixed(3) : "none yet");
    return `Loss chart: ${this.train.length} train points (latest ${last(this.train)}), ` +
      `${this.val.length} validation points (latest ${last(this.val)}).`;
  }
}

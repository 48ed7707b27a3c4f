// The status page: polls /_gateway/status.json every few seconds and renders it.
// Everything it shows comes from that JSON (whose counters are /metrics'); text from
// clients (repository names) is only ever set with textContent, never parsed as HTML.
"use strict";

const POLL_MS = 3000;
const STATUS_URL = "/_gateway/status.json";

const TEXT = {
  en: {
    title: "Registry gateway", loading: "Loading…", ready: "ready", unready: "not ready",
    offline: "no answer", updated: "updated {t}", hitRatio: "Hit ratio", saved: "Bytes saved",
    cacheUsage: "Cache usage", inFlight: "Transfers in flight", routes: "Routes", route: "Route",
    lookups: "Hits / misses / stale / coalesced", served: "Served", fetched: "Fetched upstream",
    cached: "Cached", upstreams: "Upstream health", health: "Health", lastError: "Last error",
    latency: "Latency (mean / p95)", rateLimit: "Rate limit remaining", endpoints: "Upstream URLs",
    transfers: "Transfers in flight", blob: "Blob", progress: "Progress", speed: "Speed",
    followed: "Client waiting", yes: "yes", no: "no (finishing for the cache)", noTransfers: "No blob is being fetched right now.",
    top: "Top repositories", repository: "Repository", pulls: "Pulls",
    topNote: "Manifest GETs answered since this process started.", readiness: "Readiness",
    footer: "Refreshes by itself every 3 seconds. The numbers are those of /metrics.",
    ok: "ok", degraded: "degraded", down: "down", closed: "in use", open: "skipped (breaker open)",
    half_open: "probing", none: "none", ago: "{d} ago", of: "{a} of {b}",
    lookupsDetail: "{n} cache lookups", savedDetail: "served {s}, fetched {f}",
    cacheDetail: "limit {l}", noLimit: "no limit known yet", unknownSize: "size unknown",
    readyChecks: "{n} of {m} checks pass", passed: "passed", quota: "quota {q}",
    backoff: "backing off until {t}", waiting: "waiting",
  },
  "zh-CN": {
    title: "镜像网关", loading: "加载中…", ready: "就绪", unready: "未就绪",
    offline: "无响应", updated: "更新于 {t}", hitRatio: "命中率", saved: "节省流量",
    cacheUsage: "缓存用量", inFlight: "进行中的传输", routes: "路由", route: "路由",
    lookups: "命中 / 未命中 / 过期 / 合并请求", served: "发给客户端", fetched: "上游下载",
    cached: "已缓存", upstreams: "上游状态", health: "状态", lastError: "最近错误",
    latency: "延迟（平均 / p95）", rateLimit: "剩余配额", endpoints: "上游地址",
    transfers: "进行中的传输", blob: "数据块", progress: "进度", speed: "速度",
    followed: "客户端等待", yes: "是", no: "否（为缓存继续下载）", noTransfers: "当前没有正在下载的数据块。",
    top: "热门仓库", repository: "仓库", pulls: "拉取次数",
    topNote: "自本进程启动以来应答的清单 GET 请求。", readiness: "就绪检查",
    footer: "每 3 秒自动刷新。数字与 /metrics 一致。",
    ok: "正常", degraded: "降级", down: "不可用", closed: "使用中", open: "已熔断（跳过）",
    half_open: "试探中", none: "无", ago: "{d}前", of: "{a} / {b}",
    lookupsDetail: "共 {n} 次缓存查询", savedDetail: "发给客户端 {s}，上游下载 {f}",
    cacheDetail: "上限 {l}", noLimit: "上限尚未知", unknownSize: "大小未知",
    readyChecks: "{m} 项检查中 {n} 项通过", passed: "通过", quota: "配额 {q}",
    backoff: "退避至 {t}", waiting: "等待中",
  },
};

function pickLanguage() {
  const server = document.documentElement.lang;
  if (TEXT[server]) return server;
  const browser = (navigator.languages && navigator.languages[0]) || navigator.language || "en";
  return browser.toLowerCase().startsWith("zh") ? "zh-CN" : "en";
}

const LANG = pickLanguage();
document.documentElement.lang = LANG;

function t(key, values) {
  let text = TEXT[LANG][key] ?? TEXT.en[key] ?? key;
  for (const [name, value] of Object.entries(values || {})) text = text.replace(`{${name}}`, value);
  return text;
}

// -- formatting (tests/e2e/test_status_page.py holds a copy of these rules) ------------

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

function bytes(n) {
  if (n === null || n === undefined) return "–";
  let value = n, unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) { value /= 1024; unit += 1; }
  if (unit === 0) return `${n} B`;
  return `${value.toFixed(value < 10 ? 2 : value < 100 ? 1 : 0)} ${UNITS[unit]}`;
}

function percent(ratio) {
  return ratio === null || ratio === undefined ? "–" : `${(ratio * 100).toFixed(1)}%`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  return `${seconds.toFixed(seconds < 10 ? 2 : 1)} s`;
}

function since(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (LANG === "zh-CN") {
    if (s < 60) return `${s} 秒`;
    if (s < 3600) return `${Math.floor(s / 60)} 分钟`;
    return `${Math.floor(s / 3600)} 小时`;
  }
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h`;
}

function clock(unix) {
  return new Date(unix * 1000).toLocaleTimeString(LANG, { hour12: false });
}

// -- DOM helpers ---------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function cell(field, value, text, cls) {
  return el("td", { "data-field": field, "data-value": value, class: cls }, text);
}

function pill(state) {
  return el("span", { class: "pill", "data-state": state }, t(state));
}

function fillBody(table, rows) {
  const body = document.querySelector(`#${table} tbody`);
  body.replaceChildren(...rows);
}

function translateStatic() {
  for (const node of document.querySelectorAll("[data-t]")) node.textContent = t(node.dataset.t);
  document.title = `${t("title")} · registry-gateway`;
}

// -- rendering -----------------------------------------------------------------------

function renderSummary(doc) {
  const totals = { hit: 0, looked: 0, served: 0, fetched: 0 };
  for (const r of doc.routes) {
    totals.hit += r.lookups.hit;
    totals.looked += Object.values(r.lookups).reduce((a, b) => a + b, 0);
    totals.served += r.served_bytes;
    totals.fetched += r.upstream_bytes;
  }
  const hit = document.getElementById("sum-hit");
  hit.textContent = percent(totals.looked ? totals.hit / totals.looked : null);
  document.getElementById("sum-hit-detail").textContent = t("lookupsDetail", { n: totals.looked });
  document.getElementById("sum-saved").textContent = bytes(Math.max(totals.served - totals.fetched, 0));
  document.getElementById("sum-saved-detail").textContent =
    t("savedDetail", { s: bytes(totals.served), f: bytes(totals.fetched) });
  const cache = doc.cache;
  document.getElementById("sum-cache").textContent = bytes(cache.used_bytes);
  const ratio = cache.limit_bytes ? Math.min(cache.used_bytes / cache.limit_bytes, 1) : 0;
  const fill = document.getElementById("sum-cache-bar");
  fill.style.width = `${(ratio * 100).toFixed(1)}%`;  // CSSOM: allowed by the page's CSP
  fill.parentElement.classList.toggle("full", ratio >= 0.95);
  document.getElementById("sum-cache-detail").textContent =
    cache.limit_bytes ? `${t("cacheDetail", { l: bytes(cache.limit_bytes) })} · ${percent(ratio)}`
      : t("noLimit");
  document.getElementById("sum-flight").textContent = String(doc.transfers.length);
  const passing = doc.ready.checks.filter((c) => c.ok).length;
  document.getElementById("sum-ready").textContent =
    t("readyChecks", { n: passing, m: doc.ready.checks.length });
}

function renderRoutes(doc) {
  fillBody("routes", doc.routes.map((r) => {
    const l = r.lookups;
    const cached = r.cache_quota_bytes
      ? t("of", { a: bytes(r.cache_bytes), b: bytes(r.cache_quota_bytes) }) : bytes(r.cache_bytes);
    return el("tr", { "data-route": r.name },
      el("td", {}, el("code", {}, r.name)),
      cell("hit_ratio", r.hit_ratio, percent(r.hit_ratio), "num"),
      cell("lookups", `${l.hit}/${l.miss}/${l.stale}/${l.coalesced}`,
        `${l.hit} / ${l.miss} / ${l.stale} / ${l.coalesced}`, "num"),
      cell("served_bytes", r.served_bytes, bytes(r.served_bytes), "num"),
      cell("upstream_bytes", r.upstream_bytes, bytes(r.upstream_bytes), "num"),
      cell("saved_bytes", r.saved_bytes, bytes(r.saved_bytes), "num"),
      cell("cache_bytes", r.cache_bytes, cached, "num"));
  }));
}

function renderUpstreams(doc) {
  fillBody("upstreams", doc.routes.map((r) => {
    const u = r.upstream;
    const error = u.last_error
      ? `${u.last_error.reason} · ${t("ago", { d: since(doc.generated - u.last_error.at) })}`
      : t("none");
    const limits = u.ratelimit.filter((a) => a.remaining !== undefined).map((a) =>
      `${a.account}: ${a.limit !== undefined ? t("of", { a: a.remaining, b: a.limit }) : a.remaining}`);
    if (u.backoff_until && u.backoff_until > doc.generated) limits.push(t("backoff", { t: clock(u.backoff_until) }));
    const endpoints = el("div", {}, ...u.endpoints.map((e) =>
      el("div", {}, pill(e.breaker), " ", el("code", {}, e.url))));
    return el("tr", { "data-route": r.name },
      el("td", {}, el("code", {}, r.name)),
      el("td", { "data-field": "health", "data-value": u.health }, pill(u.health)),
      cell("last_error", u.last_error ? u.last_error.reason : "", error),
      cell("latency", u.latency.mean_seconds,
        `${duration(u.latency.mean_seconds)} / ${duration(u.latency.p95_seconds)}`, "num"),
      cell("ratelimit", limits.join("; "), limits.length ? limits.join("; ") : "–"),
      el("td", {}, endpoints));
  }));
}

const lastSeen = new Map(); // digest -> [time, bytes]: the speed is the change between polls

function renderTransfers(doc) {
  const now = doc.generated;
  const seen = new Map();
  fillBody("transfers", doc.transfers.map((x) => {
    const before = lastSeen.get(x.digest);
    seen.set(x.digest, [now, x.bytes]);
    const speed = before && now > before[0] ? (x.bytes - before[1]) / (now - before[0]) : null;
    const progress = el("progress", x.size ? { max: x.size, value: x.bytes } : {});
    const text = x.size
      ? `${t("of", { a: bytes(x.bytes), b: bytes(x.size) })} (${percent(x.bytes / x.size)})`
      : `${bytes(x.bytes)} (${t("unknownSize")})`;
    return el("tr", { "data-digest": x.digest, "data-route": x.route },
      el("td", {}, el("code", {}, x.route)),
      el("td", { title: x.digest }, el("code", {}, x.digest.slice(0, 19) + "…")),
      el("td", { class: "progress", "data-field": "progress", "data-value": x.bytes,
        "data-size": x.size }, progress, el("div", {}, text)),
      cell("speed", speed, speed === null ? t("waiting") : `${bytes(Math.round(speed))}/s`, "num"),
      cell("followed", x.followed, x.followed ? t("yes") : t("no")));
  }));
  lastSeen.clear();
  for (const [k, v] of seen) lastSeen.set(k, v);
  document.getElementById("no-transfers").hidden = doc.transfers.length > 0;
}

function renderTop(doc) {
  fillBody("top", doc.top_repositories.map((p, i) =>
    el("tr", { "data-route": p.route, "data-repository": p.repository },
      el("td", { class: "num" }, i + 1), el("td", {}, el("code", {}, p.route)),
      el("td", {}, el("code", {}, p.repository)),
      cell("pulls", p.pulls, p.error ? `≤ ${p.pulls}` : p.pulls, "num"))));
}

function renderChecks(doc) {
  document.getElementById("checks").replaceChildren(...doc.ready.checks.map((c) =>
    el("li", { "data-check": c.name, "data-ok": c.ok }, el("code", {}, c.name), ": ",
      c.ok ? t("passed") : c.reason)));
}

function render(doc) {
  const state = document.getElementById("state");
  state.dataset.state = doc.ready.ready ? "ready" : "unready";
  state.textContent = doc.ready.ready ? t("ready") : t("unready");
  document.getElementById("updated").textContent = t("updated", { t: clock(doc.generated) });
  renderSummary(doc);
  renderRoutes(doc);
  renderUpstreams(doc);
  renderTransfers(doc);
  renderTop(doc);
  renderChecks(doc);
  document.body.dataset.generated = String(doc.generated);
}

async function poll() {
  try {
    const response = await fetch(STATUS_URL, { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (error) {
    const state = document.getElementById("state");
    state.dataset.state = "offline";
    state.textContent = `${t("offline")} (${error.message})`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

translateStatic();
poll();

"""The HTML of the example app, shared by the Starlette app and its FastAPI twin.

Plain f-strings: every value that comes from a user or from Redis goes through
:func:`html.escape` on its way in, so the pages need no template engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from asgi_redis_kit.metrics import FleetStats, hit_ratio, lookups

from .charts import line_chart

STYLE = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --card:#fff;
  --brand:#c2410c; --brand-dark:#9a3412; --ok:#15803d; --warn:#b45309; }
* { box-sizing: border-box; }
body { margin:0; font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
  color:var(--ink); background:var(--bg); }
header { background:#111827; color:#fff; }
header .bar { max-width:880px; margin:0 auto; padding:14px 20px; display:flex;
  align-items:center; gap:24px; }
header .logo { font-weight:700; letter-spacing:.2px; }
header .logo span { color:#fb923c; }
header nav a { color:#d1d5db; text-decoration:none; margin-right:16px; }
header nav a[aria-current] { color:#fff; border-bottom:2px solid #fb923c; padding-bottom:2px; }
main { max-width:880px; margin:28px auto; padding:0 20px; display:grid; gap:20px;
  grid-template-columns:repeat(auto-fit,minmax(320px,1fr)); }
.card { background:var(--card); border:1px solid var(--line); border-radius:12px;
  padding:22px 24px; box-shadow:0 1px 2px rgba(16,24,40,.05); }
.card.wide { grid-column:1/-1; }
h1 { font-size:30px; margin:0 0 4px; }
h2 { font-size:18px; margin:0 0 12px; }
.count { color:var(--brand); font-variant-numeric:tabular-nums; }
.muted { color:var(--muted); font-size:14px; }
.lead { font-size:18px; margin:4px 0 6px; }
.row { display:flex; flex-wrap:wrap; gap:10px; margin-top:16px; align-items:center; }
form { margin:0; display:inline; }
button, .button { font:inherit; font-size:15px; border-radius:8px; padding:8px 16px;
  border:1px solid var(--line); background:#fff; color:var(--ink); cursor:pointer;
  text-decoration:none; display:inline-block; }
button.primary, .button.primary { background:var(--brand); border-color:var(--brand);
  color:#fff; }
button.primary:hover, .button.primary:hover { background:var(--brand-dark); }
button.danger { color:#b91c1c; border-color:#fecaca; }
input[type=text] { font:inherit; padding:8px 12px; border:1px solid #cbd2d9;
  border-radius:8px; min-width:0; flex:1; }
code, .mono { font-family:ui-monospace,SFMono-Regular,Menlo,monospace; font-size:14px; }
.pill { display:inline-block; padding:2px 10px; border-radius:999px; font-size:13px;
  font-weight:600; background:#e4e7eb; }
.pill.hit { background:#dcfce7; color:var(--ok); }
.pill.miss { background:#ffedd5; color:var(--warn); }
table { border-collapse:collapse; width:100%; margin-top:8px; }
td, th { text-align:left; padding:6px 8px; border-bottom:1px solid var(--line); }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
footer { max-width:880px; margin:0 auto 32px; padding:0 20px; }
footer .status { display:flex; flex-wrap:wrap; gap:8px 24px; font-size:14px;
  color:var(--muted); border-top:1px solid var(--line); padding-top:14px; }
footer b { color:var(--ink); font-weight:600; }
figure { margin:12px 0 0; } figcaption { font-weight:600; margin-bottom:6px; }
svg.chart { width:100%; height:auto; }
.legend { font-size:14px; display:inline-flex; align-items:center; gap:6px; }
.legend i { width:12px; height:12px; border-radius:3px; display:inline-block; }
"""


@dataclass(frozen=True)
class Status:
    """Who answered: shown at the foot of every page."""

    instance: str
    framework: str
    redis: str


def _layout(title: str, active: str, body: str, status: Status, script: str = "") -> str:
    def link(href: str, label: str) -> str:
        current = ' aria-current="page"' if href == active else ""
        return f'<a href="{href}"{current}>{label}</a>'

    return f"""<!doctype html>
<html lang="es">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} · asgi_redis_kit</title>
<link rel="icon" href="data:,">
<style>{STYLE}</style>
</head>
<body>
<header><div class="bar">
  <div class="logo">asgi_redis_kit <span>demo</span></div>
  <nav>{link("/", "Visits &amp; login")}{link("/report", "Cached report")}
  {link("/rate", "Cached data")}
  {link("/stats", "Stats")}</nav>
</div></header>
<main>
{body}
</main>
<footer><div class="status" id="status">
  <span>Instance <b id="instance">{escape(status.instance)}</b></span>
  <span>Framework <b id="framework">{escape(status.framework)}</b></span>
  <span>Redis <b id="redis">{escape(status.redis)}</b></span>
</div></footer>
{script}
</body>
</html>
"""


def home_page(
    *,
    visits: int,
    user: str | None,
    user_sessions: int,
    handle: str | None,
    status: Status,
) -> str:
    if user is None:
        account = """
  <h2>Log in</h2>
  <p class="muted">No password: pick any name. Logging in rotates the session id
  (<code>regenerate()</code>) and keeps your visit count.</p>
  <form method="post" action="/login" class="row">
    <input type="text" name="name" placeholder="your name" maxlength="40" required
      aria-label="Name" id="name">
    <button class="primary" type="submit" id="login">Log in</button>
  </form>"""
    else:
        plural = "session" if user_sessions == 1 else "sessions"
        account = f"""
  <h2>Logged in as <span id="user">{escape(user)}</span></h2>
  <p class="muted"><span id="session-count">{user_sessions}</span> active {plural}
  for this user, across every browser and instance.</p>
  <div class="row">
    <form method="post" action="/logout"><button type="submit" id="logout">Log out</button></form>
    <form method="post" action="/logout-everywhere">
      <button class="danger" type="submit" id="logout-everywhere">Log out everywhere</button>
    </form>
  </div>"""
    shown_handle = (
        f'<span class="mono" id="handle">{escape(handle[:16])}</span>'
        if handle
        else '<span class="muted" id="handle">none yet (first request)</span>'
    )
    body = f"""
<section class="card wide">
  <h1>Número de visitas: <span class="count" id="visits">{visits}</span></h1>
  <p class="lead">Number of visits: {visits}. Every page load adds one.</p>
  <p class="muted">Counted with <code>await request.session.incr("visits")</code>, one
  atomic increment in Redis, so tabs loading at once never lose a visit.</p>
  <div class="row">
    <a class="button primary" href="/" id="reload">Reload</a>
    <form method="post" action="/reset"><button type="submit" id="reset">Reset</button></form>
  </div>
</section>
<section class="card">{account}
</section>
<section class="card">
  <h2>Your session</h2>
  <p class="muted">The cookie carries only a signed id; the data lives in one Redis
  hash. The cookie is <code>HttpOnly</code>, so page scripts cannot read it.</p>
  <p>Session handle: {shown_handle}</p>
  <p class="muted">A hash of the session id, safe to show: watch it change when you
  log in, as the id is rotated.</p>
</section>"""
    return _layout("Número de visitas", "/", body, status)


# Reads the cache verdict of *this* response. A cached page cannot contain its
# own X-Cache header (the HTML was frozen when it was built), and asking the
# server again with fetch() would report on a second request, not this one. The
# app's outermost middleware copies X-Cache into Server-Timing, which the
# browser exposes for the very navigation that produced the page.
REPORT_SCRIPT = """<script>
(() => {
  const out = document.getElementById("cache-status");
  const nav = performance.getEntriesByType("navigation")[0];
  const entries = nav && nav.serverTiming ? nav.serverTiming : [];
  const found = entries.find((e) => e.name === "cache");
  // The footer was frozen into the cached HTML by the instance that built it;
  // show the one that answered this request instead.
  for (const [metric, ids] of [["served-by", ["answered-by", "instance"]],
                               ["framework", ["framework"]]]) {
    const entry = entries.find((e) => e.name === metric);
    if (entry) for (const id of ids) document.getElementById(id).textContent = entry.description;
  }
  if (!found) { out.textContent = "unknown (see the X-Cache response header)"; return; }
  out.textContent = found.description;
  out.className = "pill " + found.description.toLowerCase();
})();
</script>"""


def report_page(
    *, built_at: str, build_seconds: float, rows: list[tuple[str, int]], status: Status
) -> str:
    table = "".join(
        f'<tr><td>{escape(region)}</td><td class="num">{amount:,}</td></tr>'
        for region, amount in rows
    )
    body = f"""
<section class="card wide">
  <h1>Quarterly report</h1>
  <p class="muted">Building this page takes about {build_seconds:.1f} s. It is cached
  in Redis for the route's TTL under the tag <code>report</code>, so every instance
  shares one copy.</p>
  <p class="muted" id="browser-cache">The library would tell your browser
  <code>Cache-Control: max-age</code> (the entry's remaining TTL), and the browser would
  reuse its own copy without asking. This demo sends <code>no-cache</code> instead, so
  every reload reaches the server and the badge below is about this response: a reload
  costs one Redis round trip, and an unchanged page comes back as a 304.</p>
  <div class="row">
    <span>This response: <span class="pill" id="cache-status">…</span></span>
    <span>Built at <b class="mono" id="built-at">{escape(built_at)}</b>
      by <b id="built-by">{escape(status.instance)}</b></span>
    <span>Answered by <b id="answered-by">{escape(status.instance)}</b></span>
  </div>
  <noscript><p class="muted">Without JavaScript, see the X-Cache response header
  for HIT or MISS.</p></noscript>
  <table><thead><tr><th>Region</th><th class="num">Revenue (EUR)</th></tr></thead>
  <tbody>{table}</tbody></table>
  <div class="row">
    <a class="button primary" href="/report" id="reload">Reload</a>
    <form method="post" action="/report/invalidate">
      <button type="submit" id="invalidate">Invalidate (tag: report)</button>
    </form>
  </div>
</section>"""
    return _layout("Cached report", "/report", body, status, REPORT_SCRIPT)


def rate_page(
    *,
    user: str | None,
    pair: str,
    value: float,
    age: float,
    computed_by: str,
    verdict: str,
    status: Status,
) -> str:
    greeting = f"Hola, {escape(user)}" if user else "Hola, visitante"
    body = f"""
<section class="card wide">
  <h1 id="greeting">{greeting}</h1>
  <p class="muted">The page is built for you on every request (it reads your session);
  only the slow lookup behind it is cached, with <code>@cache.memoize(ttl=30,
  tags=["rate"])</code>, so every instance shares one value.</p>
  <p class="lead">{escape(pair)}: <b class="count" id="rate-value">{value:.4f}</b></p>
  <div class="row">
    <span>This lookup: <span class="pill {verdict.lower()}" id="rate-status">{verdict}</span></span>
    <span>Age <b class="mono" id="rate-age">{age:.1f} s</b></span>
    <span>Computed by <b id="computed-by">{escape(computed_by)}</b></span>
  </div>
  <div class="row">
    <a class="button primary" href="/rate" id="reload">Reload</a>
    <form method="post" action="/rate/invalidate">
      <button type="submit" id="invalidate">Invalidar</button>
    </form>
  </div>
</section>"""
    return _layout("Cached data", "/rate", body, status)


def _percent(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio * 100:.0f}%"


def stats_page(*, fleet: FleetStats | None, interval: float, status: Status) -> str:
    """The fleet's last minutes, from the counters every instance adds into Redis."""
    if fleet is None:
        body = """
<section class="card wide"><h1>Fleet stats</h1>
<p id="stats-unavailable">Redis does not answer: no fleet counters right now.</p></section>"""
        return _layout("Fleet stats", "/stats", body, status)
    requests = {
        name: [float(m.get("http_requests", 0)) for m in row.per_minute]
        for name, row in fleet.instances.items()
    }
    ratios = {name: [hit_ratio(m) for m in row.per_minute] for name, row in fleet.instances.items()}
    rows = "".join(
        f'<tr data-instance="{escape(name)}"><td class="instance">{escape(name)}</td>'
        f'<td class="num">{row.totals.get("http_requests", 0):,}</td>'
        f'<td class="num">{lookups(row.totals):,}</td>'
        f'<td class="num">{_percent(hit_ratio(row.totals))}</td>'
        f'<td class="num">{row.totals.get("sessions.created", 0):,}</td></tr>'
        for name, row in fleet.instances.items()
    )
    minutes = len(fleet.minutes)
    body = f"""
<section class="card wide">
  <h1>Fleet stats</h1>
  <p class="muted">Every instance adds its counters into Redis every {interval:g} s, one
  hash per minute; this page reads the last {minutes} minutes back, so it shows what the
  whole fleet did, whichever instance answers. Prometheus scrapes each instance at
  <a href="/metrics"><code>/metrics</code></a>.</p>
  <table id="instances"><thead><tr><th>Instance</th><th class="num">Requests</th>
  <th class="num">Cache lookups</th><th class="num">Hit ratio</th>
  <th class="num">Sessions created</th></tr></thead>
  <tbody>{rows}</tbody>
  <tfoot><tr><th>Fleet</th>
  <th class="num" id="fleet-requests">{fleet.totals.get("http_requests", 0):,}</th>
  <th class="num">{lookups(fleet.totals):,}</th>
  <th class="num" id="fleet-hit-ratio">{_percent(hit_ratio(fleet.totals))}</th>
  <th class="num">{fleet.totals.get("sessions.created", 0):,}</th></tr></tfoot></table>
  {line_chart("Requests per minute", fleet.minutes, requests, chart_id="requests-chart")}
  {line_chart("Cache hit ratio", fleet.minutes, ratios, percent=True, chart_id="hit-ratio-chart")}
</section>"""
    return _layout("Fleet stats", "/stats", body, status)

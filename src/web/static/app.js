// pipewatch web: the live parts of the pages. Server-rendered HTML is the truth; this only
// refreshes it. Log text from JSON is set with textContent, never parsed as HTML.
'use strict';
(function () {
  const live = document.getElementById('live');
  function mark(ok) {
    if (live) {
      live.className = ok ? 'live ok' : 'live bad';
      live.textContent = ok ? 'live' : 'reconnecting';
    }
  }
  async function fetchText(url, accept) {
    const r = await fetch(url, { headers: { Accept: accept }, credentials: 'same-origin' });
    if (!r.ok) throw new Error(url + ': ' + r.status);
    return r.text();
  }
  // Replaces a container's children with server-rendered (escaped) markup, parsed inertly.
  function replaceWith(container, html, wrap) {
    const doc = new DOMParser().parseFromString(wrap[0] + html + wrap[1], 'text/html');
    const src = wrap[2](doc);
    if (!src) return;
    container.replaceChildren(...Array.from(src.childNodes).map((n) => document.importNode(n, true)));
  }
  function every(ms, fn) {
    async function tick() {
      try { await fn(); mark(true); } catch (e) { mark(false); }
      setTimeout(tick, ms);
    }
    setTimeout(tick, ms);
  }

  // One experiment: the progress tree every 2 s, the charts every 10 s.
  const progress = document.getElementById('progress');
  if (progress) {
    every(2000, async () => {
      const html = await fetchText(progress.dataset.src, 'text/html');
      replaceWith(progress.tBodies[0], html, ['<table><tbody>', '</tbody></table>', (d) => d.querySelector('tbody')]);
      progress.dataset.refreshed = String(Number(progress.dataset.refreshed || 0) + 1);
    });
  }
  const charts = document.getElementById('charts');
  if (charts) {
    every(10000, async () => {
      const html = await fetchText(charts.dataset.src, 'text/html');
      replaceWith(charts, html, ['<div>', '</div>', (d) => d.body.firstElementChild]);
    });
  }

  // Logs: follow new rows (oldest first from the server), newest on top.
  const rows = document.getElementById('logrows');
  const follow = document.getElementById('follow');
  const HIDDEN = /[\u0000-\u0008\u000B-\u001F\u007F-\u009F\u200B-\u200F\u202A-\u202E\u2066-\u2069\u061C\uFEFF]/g;
  function visible(s) {
    return s == null ? '' : String(s).replace(HIDDEN, (c) => '\\u{' + c.codePointAt(0).toString(16).toUpperCase().padStart(4, '0') + '}');
  }
  function dt(s) {
    return s ? new Date(s).toISOString().replace('T', ' ').slice(0, 19) : '-';
  }
  function td(tr, text, cls) {
    const c = document.createElement('td');
    if (cls) c.className = cls;
    c.textContent = text;
    tr.appendChild(c);
    return c;
  }
  function logRow(r) {
    const tr = document.createElement('tr');
    tr.className = 'lv-' + r.level + ' new';
    td(tr, dt(r.ts), 'ts');
    const lv = td(tr, '');
    const badge = document.createElement('span');
    badge.className = 'badge lv-' + r.level;
    badge.textContent = r.level;
    lv.appendChild(badge);
    td(tr, visible(r.node_id || '-') + (r.stage ? '/' + visible(r.stage) : ''));
    const msg = td(tr, visible(r.message), 'msg');
    if (r.traceback) {
      const pre = document.createElement('pre');
      pre.className = 'traceback';
      pre.textContent = visible(r.traceback);
      msg.appendChild(pre);
    }
    return tr;
  }
  if (rows && follow) {
    every(2000, async () => {
      if (!follow.checked) return;
      const url = rows.dataset.src + '&after_id=' + encodeURIComponent(rows.dataset.newest) + '&limit=1000';
      const list = JSON.parse(await fetchText(url, 'application/json'));
      for (const r of list) {
        rows.insertBefore(logRow(r), rows.firstChild);
        rows.dataset.newest = String(Math.max(Number(rows.dataset.newest), r.id));
      }
      const none = document.getElementById('norows');
      if (none && list.length) none.remove();
    });
  }
})();

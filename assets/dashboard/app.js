// The opsagent-audit dashboard: a small client of the same HTTP API everyone else uses.
//
// Everything a record holds is attacker-controlled text (a cluster's tool output, a
// user's question), so it only ever reaches the page as text nodes: `el` turns strings
// into text, links are checked by `safeHref`, and nothing here assigns HTML. The
// Content-Security-Policy the server sends (no inline scripts) is the second wall.
'use strict';

(() => {
  const TOKEN_KEY = 'opsagent-audit.token';
  const POLL_MS = 5000;
  const PAGE = 50;
  const FOLD_LINES = 25;
  const FILTER_KEYS = ['range', 'from', 'to', 'user_id', 'model_name', 'provider', 'cluster', 'status', 'tool_name', 'q'];
  const RANGES = [['1h', 'Last hour'], ['24h', 'Last 24 hours'], ['7d', 'Last 7 days'], ['30d', 'Last 30 days'], ['', 'All time']];
  const STATUSES = ['', 'success', 'error', 'timeout', 'cancelled'];

  // ---- DOM ---------------------------------------------------------------------------

  /** An element; string and number children become text nodes, never markup. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key === 'href') {
        const href = safeHref(value);
        if (href) node.setAttribute('href', href);
      } else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (key === 'width') node.style.width = value;
      else if (key === 'left') node.style.left = value;
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /** The link if it is one of ours (`#/…`) or plain http(s); anything else (javascript:, data:) is refused. */
  function safeHref(url) {
    if (typeof url !== 'string') return null;
    if (url.startsWith('#/')) return url;
    try {
      const parsed = new URL(url, window.location.href);
      return parsed.protocol === 'http:' || parsed.protocol === 'https:' ? parsed.href : null;
    } catch (_) {
      return null;
    }
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  // ---- API ---------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, field) {
      super(message);
      this.status = status;
      this.code = code;
      this.field = field;
    }
  }

  function token() {
    return window.sessionStorage.getItem(TOKEN_KEY);
  }

  function authHeaders() {
    const t = token();
    return t ? { Authorization: 'Bearer ' + t } : {};
  }

  async function request(path, params) {
    const query = params ? '?' + new URLSearchParams(params).toString() : '';
    let response;
    try {
      response = await fetch(path + query, { headers: authHeaders(), cache: 'no-store' });
    } catch (e) {
      throw new ApiError(0, 'unreachable', 'the server did not answer: ' + e.message);
    }
    if (response.ok) return response;
    let body = {};
    try {
      body = await response.json();
    } catch (_) { /* not JSON: the status says enough */ }
    const error = body.error || {};
    throw new ApiError(response.status, error.code || 'http_' + response.status, error.message || response.statusText, error.field);
  }

  async function api(path, params) {
    return (await request(path, params)).json();
  }

  // ---- Formatting ---------------------------------------------------------------------

  const pad = (n) => String(n).padStart(2, '0');

  function formatTime(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function formatMs(ms) {
    if (ms === null || ms === undefined) return '–';
    if (ms < 1000) return Math.round(ms) + ' ms';
    if (ms < 60000) return (ms / 1000).toFixed(1) + ' s';
    return (ms / 60000).toFixed(1) + ' min';
  }

  function statusBadge(status) {
    return el('span', { class: 'badge status-' + status, 'data-status': status }, status);
  }

  // ---- Filters (in the URL, so a view can be shared) ----------------------------------

  function parseHash() {
    const hash = window.location.hash.replace(/^#/, '') || '/';
    const [path, query] = hash.split('?', 2);
    return { path, params: new URLSearchParams(query || '') };
  }

  function go(path, params) {
    const query = params && params.toString();
    window.location.hash = '#' + path + (query ? '?' + query : '');
  }

  /** The filter of the page's URL as API query parameters. */
  function apiFilter(params) {
    const out = {};
    const range = params.get('range');
    if (range) out.since = range;
    for (const key of ['from', 'to']) {
      const value = params.get(key);
      if (value) {
        const d = new Date(value);
        out[key] = isNaN(d) ? value : d.toISOString();
      }
    }
    for (const key of FILTER_KEYS.slice(3)) {
      const value = params.get(key);
      if (value) out[key] = value;
    }
    return out;
  }

  function filterBar(path, params, extra) {
    const field = (name, label, attrs) =>
      el('label', {}, label, el('input', Object.assign({ name, value: params.get(name) || '' }, attrs || {})));
    const select = (name, label, options) => {
      const current = params.get(name) || '';
      return el('label', {}, label,
        el('select', { name }, options.map(([value, text]) => el('option', { value, selected: value === current }, text))));
    };
    const form = el('form', { class: 'filters', 'data-filters': '' },
      select('range', 'Time', RANGES),
      field('from', 'From', { type: 'datetime-local' }),
      field('to', 'To', { type: 'datetime-local' }),
      field('user_id', 'User'),
      field('model_name', 'Model'),
      field('provider', 'Provider'),
      field('cluster', 'Cluster'),
      select('status', 'Status', STATUSES.map((s) => [s, s || 'any'])),
      field('tool_name', 'Tool'),
      field('q', 'Text', { type: 'search', placeholder: 'question or answer' }),
      el('button', { type: 'submit' }, 'Apply'),
      el('a', { href: '#' + path, class: 'button secondary' }, 'Reset'),
      extra || null);
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      const next = new URLSearchParams();
      for (const [key, value] of new FormData(form)) {
        if (value) next.set(key, value);
      }
      go(path, next);
    });
    return form;
  }

  // ---- Views ----------------------------------------------------------------------------

  let generation = 0;
  let timers = [];

  function stopTimers() {
    timers.forEach((t) => window.clearInterval(t));
    timers = [];
  }

  /** Renders a view unless the user navigated elsewhere meanwhile. */
  async function show(view, render) {
    const mine = ++generation;
    const started = performance.now();
    stopTimers();
    document.body.dataset.view = view;
    document.body.dataset.state = 'loading';
    for (const link of document.querySelectorAll('[data-nav]')) {
      link.classList.toggle('active', link.dataset.nav === view);
    }
    try {
      const content = await render(() => mine !== generation);
      if (mine !== generation) return;
      clear(document.getElementById('main')).appendChild(content);
      document.body.dataset.state = 'ready';
      document.body.dataset.renderMs = String(Math.round(performance.now() - started));
      // Since the navigation began (the page's time origin): on a fresh load, the time a
      // person waits for this view, assets and API answer included.
      document.body.dataset.readyMs = String(Math.round(performance.now()));
    } catch (error) {
      if (mine !== generation) return;
      showError(error);
    }
  }

  function showError(error) {
    const main = clear(document.getElementById('main'));
    document.body.dataset.state = 'error';
    if (error instanceof ApiError && error.status === 401) {
      main.appendChild(loginForm(token()
        ? 'That token was not accepted. Enter an API token with the read role.'
        : 'This server requires an API token. Enter one with the read role.'));
      document.body.dataset.state = 'login';
      return;
    }
    if (error instanceof ApiError && error.status === 403) {
      main.appendChild(el('div', { class: 'panel error', 'data-error': 'forbidden' },
        el('h2', {}, 'Not allowed'),
        el('p', {}, error.message),
        el('p', {}, 'Your token does not have the role this page needs. ',
          el('a', { href: '#/login' }, 'Use another token'), '.')));
      return;
    }
    main.appendChild(el('div', { class: 'panel error', 'data-error': error.code || 'error' },
      el('h2', {}, error.status === 404 ? 'Not found' : 'Something went wrong'),
      el('p', {}, error.message)));
  }

  function loginForm(message) {
    const input = el('input', { type: 'password', name: 'token', autocomplete: 'off', required: true, 'aria-label': 'API token' });
    const form = el('form', { class: 'panel login', 'data-login': '' },
      el('h2', {}, 'Sign in'),
      el('p', {}, message),
      input,
      el('button', { type: 'submit' }, 'Sign in'),
      el('p', { class: 'muted' }, 'The token is kept in this tab only (session storage) and sent as a Bearer token.'));
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      window.sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      updateWho();
      const { path } = parseHash();
      if (path === '/login') go('/');
      else route();
    });
    return form;
  }

  function updateWho() {
    const who = clear(document.getElementById('who'));
    if (token()) {
      who.appendChild(el('a', {
        href: '#/', onclick: () => { window.sessionStorage.removeItem(TOKEN_KEY); updateWho(); },
      }, 'Sign out'));
    }
  }

  // -- Interactions -------------------------------------------------------------------------

  function listRow(item, fresh) {
    const link = '#/i/' + item.interaction_id;
    const row = el('tr', { 'data-id': item.interaction_id, class: fresh ? 'fresh' : null },
      el('td', { class: 'nowrap' }, formatTime(item.created_at)),
      el('td', {}, item.user_id || '–'),
      el('td', {}, item.cluster || '–'),
      el('td', {}, item.model_name || '–'),
      el('td', { class: 'question' }, el('a', { href: link, title: item.question }, item.question)),
      el('td', {}, statusBadge(item.status)),
      el('td', { class: 'num' }, formatMs(item.total_duration_ms)),
      el('td', { class: 'num', title: 'tool calls' }, item.tool_call_count));
    row.addEventListener('click', (event) => {
      if (event.target.tagName !== 'A') window.location.hash = link;
    });
    return row;
  }

  function exportButtons(params) {
    const filter = apiFilter(params);
    const button = (format, label) => el('button', {
      type: 'button', class: 'secondary', 'data-export': format,
      onclick: async (event) => {
        const target = event.currentTarget;
        target.disabled = true;
        try {
          await download('/api/v1/export', Object.assign({ format }, filter));
        } catch (error) {
          showError(error);
        } finally {
          target.disabled = false;
        }
      },
    }, label);
    return el('span', { class: 'exports' }, 'Export: ', button('csv', 'CSV'), button('ndjson', 'NDJSON'), button('parquet', 'Parquet'));
  }

  /** Downloads through fetch, so the token goes in a header (never in a URL or a log). */
  async function download(path, params) {
    const response = await request(path, params);
    const disposition = response.headers.get('content-disposition') || '';
    const name = (/filename="([^"]+)"/.exec(disposition) || [])[1] || 'opsagent-audit-export';
    const url = URL.createObjectURL(await response.blob());
    const link = el('a', {}, name);
    link.href = url;
    link.download = name;
    document.body.appendChild(link);
    link.click();
    link.remove();
    window.setTimeout(() => URL.revokeObjectURL(url), 60000);
  }

  async function listView(params, stale) {
    const filter = apiFilter(params);
    const page = await api('/api/v1/interactions', Object.assign({ limit: PAGE }, filter));
    if (stale()) return null;
    const seen = new Set(page.items.map((i) => i.interaction_id));
    const body = el('tbody', {}, page.items.map((i) => listRow(i, false)));
    const table = el('table', { class: 'list', 'data-list': '' },
      el('thead', {}, el('tr', {},
        ['Time', 'User', 'Cluster', 'Model', 'Question', 'Status', 'Duration', 'Tools'].map((h) => el('th', {}, h)))),
      body);
    const empty = el('p', { class: 'muted', hidden: page.items.length > 0 }, 'No interactions match this filter.');
    const live = el('span', { class: 'muted live', 'data-live': '' }, 'live: checking every 5 s');
    let cursor = page.next_cursor;
    const more = el('button', { type: 'button', class: 'secondary', 'data-more': '', hidden: !cursor }, 'Load more');
    more.addEventListener('click', async () => {
      more.disabled = true;
      try {
        const next = await api('/api/v1/interactions', Object.assign({ limit: PAGE, cursor }, filter));
        for (const item of next.items) {
          if (!seen.has(item.interaction_id)) {
            seen.add(item.interaction_id);
            body.appendChild(listRow(item, false));
          }
        }
        cursor = next.next_cursor;
        more.hidden = !cursor;
      } catch (error) {
        showError(error);
      } finally {
        more.disabled = false;
      }
    });
    // Polling rather than server-sent events: the first page is one keyset query of a few
    // milliseconds, it works through every proxy and load balancer, and records may be
    // committed by another process (a worker in distributed mode) that could not push.
    const poll = async () => {
      if (document.hidden) return;
      try {
        const latest = await api('/api/v1/interactions', Object.assign({ limit: PAGE }, filter));
        const fresh = latest.items.filter((i) => !seen.has(i.interaction_id));
        for (const item of fresh.reverse()) {
          seen.add(item.interaction_id);
          body.insertBefore(listRow(item, true), body.firstChild);
        }
        if (fresh.length) empty.hidden = true;
        live.textContent = 'live: updated ' + formatTime(new Date().toISOString()).slice(11);
      } catch (_) {
        live.textContent = 'live: the server did not answer; retrying';
      }
    };
    timers.push(window.setInterval(poll, POLL_MS));
    return el('section', {},
      filterBar('/', params),
      el('div', { class: 'toolbar' }, exportButtons(params), live),
      table, empty, more);
  }

  // -- One interaction -----------------------------------------------------------------

  function meta(pairs) {
    return el('dl', { class: 'meta' }, pairs.filter(([, v]) => v !== null && v !== undefined && v !== '')
      .map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
  }

  /** A block of text, folded after FOLD_LINES lines with a button to unfold it. */
  function folded(text, kind) {
    const lines = text.split('\n');
    const pre = el('pre', { class: 'mono ' + kind });
    if (lines.length <= FOLD_LINES) {
      pre.textContent = text;
      return pre;
    }
    pre.textContent = lines.slice(0, FOLD_LINES).join('\n');
    const more = el('button', { type: 'button', class: 'link', 'data-unfold': '' }, `show all ${lines.length} lines`);
    more.addEventListener('click', () => {
      pre.textContent = text;
      more.remove();
    });
    return el('div', {}, pre, more);
  }

  function bars(rows, scale, kind) {
    return el('div', { class: 'bars ' + kind }, rows.map(({ label, start, length, text, error }) =>
      el('div', { class: 'bar-row' },
        el('span', { class: 'bar-label', title: label }, label),
        el('span', { class: 'bar-track' },
          el('span', { class: 'bar' + (error ? ' failed' : ''), left: pct(start, scale), width: pct(length, scale, 0.4) })),
        el('span', { class: 'bar-value' }, text))));
  }

  function pct(value, scale, minimum) {
    const p = scale > 0 ? (100 * value) / scale : 0;
    return Math.max(minimum || 0, Math.min(100, p)).toFixed(2) + '%';
  }

  /** Tool calls on a time axis. Records carry each call's duration and order, not its start, so calls are laid end to end. */
  function waterfall(record) {
    const calls = record.tool_calls;
    if (!calls.length) return el('p', { class: 'muted' }, 'No tool calls.');
    let start = 0;
    const rows = calls.map((c) => {
      const row = { label: `#${c.sequence_number} ${c.tool_name}`, start, length: c.duration_ms || 0, text: formatMs(c.duration_ms), error: !!c.error };
      start += c.duration_ms || 0;
      return row;
    });
    const scale = Math.max(start, record.total_duration_ms || 0);
    return el('div', { 'data-waterfall': '' }, bars(rows, scale, 'waterfall'),
      el('p', { class: 'muted small' }, `Axis: ${formatMs(scale)}. Calls are placed end to end in order (records carry durations, not start times).`));
  }

  function timings(record) {
    const rows = [['total', record.total_duration_ms], ['assistant', record.assistant_duration_ms], ['parse', record.parse_duration_ms]]
      .concat(Object.entries(record.metrics || {}))
      .filter(([, v]) => v !== null && v !== undefined)
      .map(([label, v]) => ({ label, start: 0, length: v, text: formatMs(v) }));
    if (!rows.length) return el('p', { class: 'muted' }, 'No timings recorded.');
    return bars(rows, Math.max(...rows.map((r) => r.length)), 'timings');
  }

  function toolCallItem(call) {
    return el('li', { class: 'step tool' + (call.error ? ' failed' : ''), 'data-tool-seq': call.sequence_number, 'data-tool-name': call.tool_name },
      el('div', { class: 'step-head' },
        el('span', { class: 'kind' }, 'tool'),
        el('strong', {}, `#${call.sequence_number} ${call.tool_name}`),
        el('span', { class: 'muted' }, formatMs(call.duration_ms))),
      folded(call.tool_input || '', 'input'),
      call.tool_observation !== null && call.tool_observation !== undefined
        ? el('details', { open: true }, el('summary', {}, 'output'), folded(call.tool_observation, 'output'))
        : null,
      call.error ? el('div', { class: 'error-text' }, folded(call.error, 'error')) : null);
  }

  /** Thoughts and tool calls in the order they happened: each call after the thought that led to it. */
  function steps(record) {
    const thoughts = [...record.thoughts].sort((a, b) => a.sequence_number - b.sequence_number);
    const calls = [...record.tool_calls].sort((a, b) => a.sequence_number - b.sequence_number);
    const linked = calls.some((c) => c.thought_sequence_number !== null && c.thought_sequence_number !== undefined);
    const items = [];
    if (linked) {
      const placed = new Set();
      for (const t of thoughts) {
        items.push({ thought: t });
        for (const c of calls) {
          if (c.thought_sequence_number === t.sequence_number) {
            items.push({ call: c });
            placed.add(c);
          }
        }
      }
      calls.filter((c) => !placed.has(c)).forEach((c) => items.push({ call: c }));
    } else {
      // No links: a ReAct loop thinks, then acts; pair them by position.
      const n = Math.max(thoughts.length, calls.length);
      for (let i = 0; i < n; i++) {
        if (thoughts[i]) items.push({ thought: thoughts[i] });
        if (calls[i]) items.push({ call: calls[i] });
      }
    }
    return items.map((item) => item.thought
      ? el('li', { class: 'step thought', 'data-thought-seq': item.thought.sequence_number },
        el('div', { class: 'step-head' }, el('span', { class: 'kind' }, 'thought'), el('strong', {}, '#' + item.thought.sequence_number)),
        el('p', { class: 'prose' }, item.thought.content))
      : toolCallItem(item.call));
  }

  async function detailView(id, stale) {
    const record = await api('/api/v1/interactions/' + encodeURIComponent(id));
    if (stale()) return null;
    document.title = 'opsagent-audit · interaction';
    const tokens = record.input_tokens !== null || record.output_tokens !== null
      ? `${record.input_tokens ?? '–'} in / ${record.output_tokens ?? '–'} out` : null;
    return el('article', { class: 'detail', 'data-interaction': record.interaction_id },
      el('div', { class: 'title-row' }, statusBadge(record.status), el('h1', { class: 'prose' }, record.question)),
      record.error ? el('div', { class: 'panel error', 'data-record-error': '' }, el('strong', {}, 'Error: '), record.error) : null,
      meta([
        ['Time', formatTime(record.created_at)],
        ['User', record.user_id],
        ['Session', el('a', { href: '#/s/' + record.session_id, 'data-session-link': '' }, record.session_id)],
        ['Cluster', record.cluster],
        ['Model', record.model_name],
        ['Provider', record.provider],
        ['Base URL', record.base_url],
        ['Endpoint', record.endpoint],
        ['HTTP status', record.http_status],
        ['Client', [record.client_ip, record.user_agent].filter(Boolean).join(' · ')],
        ['Tokens', tokens],
        ['Duration', formatMs(record.total_duration_ms)],
        ['Id', record.interaction_id],
      ]),
      el('div', { class: 'columns' },
        el('section', {}, el('h2', {}, 'Tool calls'), waterfall(record)),
        el('section', {}, el('h2', {}, 'Stage timings'), timings(record))),
      el('h2', {}, 'What happened'),
      el('ol', { class: 'timeline', 'data-timeline': '' },
        el('li', { class: 'step question' }, el('div', { class: 'step-head' }, el('span', { class: 'kind' }, 'question')), el('p', { class: 'prose' }, record.question)),
        steps(record),
        el('li', { class: 'step answer' }, el('div', { class: 'step-head' }, el('span', { class: 'kind' }, 'answer')),
          record.final_answer ? markdown(record.final_answer) : el('p', { class: 'muted' }, 'No answer recorded.'))),
      Object.keys(record.attributes || {}).length
        ? el('details', {}, el('summary', {}, 'Attributes'), folded(JSON.stringify(record.attributes, null, 2), 'json'))
        : null);
  }

  // -- Session -------------------------------------------------------------------------------

  async function sessionView(id, stale) {
    const session = await api('/api/v1/sessions/' + encodeURIComponent(id));
    if (stale()) return null;
    return el('article', { class: 'session', 'data-session': session.session_id },
      el('h1', {}, 'Session'),
      meta([
        ['User', session.user_id],
        ['Started', formatTime(session.created_at)],
        ['Interactions', session.interaction_count],
        ['Client', [session.client_ip, session.user_agent].filter(Boolean).join(' · ')],
        ['Id', session.session_id],
      ]),
      el('ol', { class: 'conversation' }, session.interactions.map((r) =>
        el('li', { class: 'turn', 'data-turn': r.interaction_id },
          el('div', { class: 'turn-head' },
            el('span', { class: 'muted' }, formatTime(r.created_at)), ' ', statusBadge(r.status), ' ',
            el('span', { class: 'muted' }, [r.model_name, formatMs(r.total_duration_ms), `${r.tool_calls.length} tool calls`].filter(Boolean).join(' · ')), ' ',
            el('a', { href: '#/i/' + r.interaction_id }, 'details')),
          el('div', { class: 'ask' }, el('span', { class: 'kind' }, 'asked'), el('p', { class: 'prose' }, r.question)),
          el('div', { class: 'reply' }, el('span', { class: 'kind' }, 'answered'),
            r.final_answer ? markdown(r.final_answer) : el('p', { class: 'muted' }, r.error || 'No answer recorded.'))))));
  }

  // -- Analysis ------------------------------------------------------------------------------

  function rangeHours(params) {
    const range = params.get('range');
    const m = /^(\d+)([hd])$/.exec(range || '');
    if (m) return Number(m[1]) * (m[2] === 'd' ? 24 : 1);
    const from = params.get('from') ? new Date(params.get('from')) : null;
    const to = params.get('to') ? new Date(params.get('to')) : new Date();
    return from && !isNaN(from) ? (to - from) / 3600000 : 24 * 30;
  }

  /** Series per model over time buckets, for uPlot (x in seconds). */
  function seriesByKey(rows, value, missing) {
    const buckets = [...new Set(rows.map((r) => r.bucket))].sort();
    const keys = [...new Set(rows.map((r) => r.key ?? '(none)'))];
    const index = new Map(buckets.map((b, i) => [b, i]));
    const data = [buckets.map((b) => Date.parse(b) / 1000)];
    for (const key of keys) {
      // A bucket without a row: no requests (volume 0), or no value to show (a gap).
      const column = buckets.map(() => (missing === undefined ? null : missing));
      for (const r of rows) if ((r.key ?? '(none)') === key) column[index.get(r.bucket)] = value(r);
      data.push(column);
    }
    return { keys, data };
  }

  const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf'];

  /** The x range of the charts in seconds: the chosen time range, else the data's own with a bucket of margin. */
  function timeWindow(params, data, bucketSeconds) {
    const now = Date.now() / 1000;
    const range = /^(\d+)([hd])$/.exec(params.get('range') || '');
    const from = params.get('from') ? Date.parse(params.get('from')) / 1000 : null;
    const to = params.get('to') ? Date.parse(params.get('to')) / 1000 : null;
    if (range) return [now - Number(range[1]) * (range[2] === 'd' ? 86400 : 3600), now];
    const xs = data[0];
    const first = xs.length ? xs[0] : now - 86400;
    const last = xs.length ? xs[xs.length - 1] : now;
    return [from && !isNaN(from) ? from : first - bucketSeconds, to && !isNaN(to) ? to : Math.max(last + bucketSeconds, now)];
  }

  function chart(title, name, { keys, data }, unit, window_) {
    const box = el('figure', { class: 'chart', 'data-chart': name }, el('figcaption', {}, title));
    if (data[0].length === 0) {
      box.appendChild(el('p', { class: 'muted' }, 'No data in this range.'));
      return box;
    }
    // Drawn once the figure is in the page, at its width.
    window.requestAnimationFrame(() => {
      const width = Math.max(320, box.clientWidth - 16);
      const options = {
        width, height: 220,
        scales: { x: { time: true, range: () => window_ } },
        series: [{}].concat(keys.map((k, i) => ({ label: k, stroke: PALETTE[i % PALETTE.length], width: 1.5, points: { show: true, size: 5 }, value: (u, v) => v === null ? '–' : (Math.round(v * 10) / 10) + unit }))),
        axes: [{}, { size: 70, values: (u, ticks) => ticks.map((t) => t + unit) }],
      };
      // eslint-disable-next-line no-new
      new window.uPlot(options, data, box);
      box.dataset.drawn = 'true';
    });
    return box;
  }

  function topTable(title, name, rows, columns) {
    const max = Math.max(1, ...rows.map((r) => columns[0].value(r) || 0));
    return el('section', { class: 'top', 'data-top': name }, el('h3', {}, title),
      rows.length === 0 ? el('p', { class: 'muted' }, 'None.') : el('table', { class: 'compact' },
        el('tbody', {}, rows.map((r) => el('tr', {},
          el('td', { class: 'label', title: r.key ?? r.question }, r.key ?? r.question ?? '(none)'),
          el('td', { class: 'spark' }, el('span', { class: 'bar', width: pct(columns[0].value(r) || 0, max) })),
          columns.map((c) => el('td', { class: 'num' }, c.text(r))))))));
  }

  async function analysisView(params, stale) {
    const filter = apiFilter(params);
    const bucket = rangeHours(params) > 72 ? 'day' : 'hour';
    const [stats, overview] = await Promise.all([
      api('/api/v1/stats', Object.assign({ group_by: 'model_name', bucket }, filter)),
      api('/api/v1/stats/overview', Object.assign({ top: 10 }, filter)),
    ]);
    if (stale()) return null;
    // The busiest eight models get a line each; more would be unreadable.
    const totals = new Map();
    for (const r of stats.rows) totals.set(r.key, (totals.get(r.key) || 0) + r.count);
    const shown = new Set([...totals.entries()].sort((a, b) => b[1] - a[1]).slice(0, 8).map(([k]) => k));
    const rows = stats.rows.filter((r) => shown.has(r.key));
    const count = (r) => r.count;
    const volume = seriesByKey(rows, count, 0);
    const xWindow = timeWindow(params, volume.data, bucket === 'day' ? 86400 : 3600);
    return el('section', { class: 'analysis' },
      filterBar('/analysis', params),
      el('p', { class: 'muted' }, `By model, per ${bucket} (UTC buckets).`),
      el('div', { class: 'charts' },
        chart('Volume', 'volume', volume, '', xWindow),
        chart('Error rate', 'error_rate', seriesByKey(rows, (r) => 100 * r.error_rate), '%', xWindow),
        chart('p95 latency', 'p95', seriesByKey(rows, (r) => r.p95_ms), ' ms', xWindow)),
      el('div', { class: 'tops' },
        topTable('Most used tools', 'most_used_tools', overview.most_used_tools, [{ value: count, text: count }]),
        topTable('Slowest tools (p95)', 'slowest_tools', overview.slowest_tools, [{ value: (r) => r.p95_ms, text: (r) => formatMs(r.p95_ms) }]),
        topTable('Most failing tools', 'most_failing_tools', overview.most_failing_tools, [{ value: (r) => r.error_count, text: (r) => `${r.error_count} (${(100 * r.error_rate).toFixed(1)}%)` }]),
        topTable('Busiest users', 'busiest_users', overview.busiest_users, [{ value: count, text: count }]),
        topTable('Busiest clusters', 'busiest_clusters', overview.busiest_clusters, [{ value: count, text: count }]),
        topTable('Frequent questions', 'frequent_questions', overview.frequent_questions, [{ value: count, text: count }])));
  }

  // -- Dead letters -------------------------------------------------------------------------

  function deadLetterRow(letter) {
    return el('tr', { 'data-dead-letter': letter.interaction_id },
      el('td', { class: 'nowrap' }, formatTime(letter.failed_at)),
      el('td', { class: 'mono small' }, letter.interaction_id),
      el('td', { class: 'error-text' }, letter.error),
      el('td', { class: 'num' }, letter.attempts),
      el('td', {}, el('details', {}, el('summary', {}, 'record'), folded(letter.record, 'json'))));
  }

  async function deadLettersView(stale) {
    const page = await api('/api/v1/dead-letters', { limit: PAGE });
    if (stale()) return null;
    const body = el('tbody', {}, page.items.map(deadLetterRow));
    let cursor = page.next_cursor;
    const more = el('button', { type: 'button', class: 'secondary', hidden: !cursor }, 'Load more');
    more.addEventListener('click', async () => {
      const next = await api('/api/v1/dead-letters', { limit: PAGE, cursor });
      next.items.forEach((l) => body.appendChild(deadLetterRow(l)));
      cursor = next.next_cursor;
      more.hidden = !cursor;
    });
    return el('section', {},
      el('h1', {}, 'Dead letters'),
      el('p', { class: 'muted' }, 'Records the database refused, with its reason. They are kept here, never lost; fix the cause and send them again.'),
      page.items.length === 0 ? el('p', { class: 'muted', 'data-empty': '' }, 'None: the database has refused nothing.') : null,
      el('table', { class: 'list' },
        el('thead', {}, el('tr', {}, ['Failed', 'Interaction', 'Reason', 'Attempts', ''].map((h) => el('th', {}, h)))),
        body),
      more);
  }

  // ---- Markdown, rendered to DOM nodes (a safe subset; never HTML) -------------------------

  function markdown(text) {
    const root = el('div', { class: 'markdown', 'data-markdown': '' });
    const lines = text.replace(/\r\n?/g, '\n').split('\n');
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = /^\s*```(.*)$/.exec(line);
      if (fence) {
        const code = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
        i++;
        root.appendChild(el('pre', { class: 'mono' }, el('code', {}, code.join('\n'))));
        continue;
      }
      const heading = /^(#{1,6})\s+(.*)$/.exec(line);
      if (heading) {
        root.appendChild(el('h' + Math.min(6, heading[1].length + 2), {}, inline(heading[2])));
        i++;
        continue;
      }
      const bullet = /^\s*([-*+]|\d+[.)])\s+/;
      if (bullet.test(line)) {
        const ordered = /^\s*\d/.test(line);
        const list = el(ordered ? 'ol' : 'ul', {});
        while (i < lines.length && bullet.test(lines[i])) {
          list.appendChild(el('li', {}, inline(lines[i].replace(bullet, ''))));
          i++;
        }
        root.appendChild(list);
        continue;
      }
      if (!line.trim()) {
        i++;
        continue;
      }
      const paragraph = [];
      while (i < lines.length && lines[i].trim() && !bullet.test(lines[i]) && !/^\s*```/.test(lines[i]) && !/^#{1,6}\s/.test(lines[i])) {
        paragraph.push(lines[i++]);
      }
      root.appendChild(el('p', {}, inline(paragraph.join('\n'))));
    }
    return root;
  }

  /** `code`, **bold**, *emphasis* and [links](http…) as nodes; everything else stays text. */
  function inline(text) {
    const out = [];
    const pattern = /`([^`]+)`|\*\*([^*]+)\*\*|\*([^*]+)\*|\[([^\]]+)\]\(([^)\s]+)\)/g;
    let last = 0;
    let m;
    while ((m = pattern.exec(text)) !== null) {
      if (m.index > last) out.push(text.slice(last, m.index));
      if (m[1] !== undefined) out.push(el('code', {}, m[1]));
      else if (m[2] !== undefined) out.push(el('strong', {}, m[2]));
      else if (m[3] !== undefined) out.push(el('em', {}, m[3]));
      else {
        const href = safeHref(m[5]);
        out.push(href && !href.startsWith('#')
          ? el('a', { href, rel: 'noopener noreferrer nofollow', target: '_blank' }, m[4])
          : m[0]);
      }
      last = pattern.lastIndex;
    }
    if (last < text.length) out.push(text.slice(last));
    return out;
  }

  // ---- Routing ---------------------------------------------------------------------------

  function route() {
    const { path, params } = parseHash();
    document.title = 'opsagent-audit';
    let m;
    if (path === '/login') {
      stopTimers();
      document.body.dataset.view = 'login';
      clear(document.getElementById('main')).appendChild(loginForm('Enter an API token (role read; admin for dead letters).'));
      document.body.dataset.state = 'login';
    } else if ((m = /^\/i\/([^/]+)$/.exec(path))) {
      show('detail', (stale) => detailView(decodeURIComponent(m[1]), stale));
    } else if ((m = /^\/s\/([^/]+)$/.exec(path))) {
      show('session', (stale) => sessionView(decodeURIComponent(m[1]), stale));
    } else if (path === '/analysis') {
      show('analysis', (stale) => analysisView(params, stale));
    } else if (path === '/dead-letters') {
      show('dead-letters', (stale) => deadLettersView(stale));
    } else {
      show('list', (stale) => listView(params, stale));
    }
  }

  window.addEventListener('hashchange', route);
  window.addEventListener('DOMContentLoaded', () => {
    updateWho();
    route();
  });
})();

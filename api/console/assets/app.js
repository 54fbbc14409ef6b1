// Hatchery's web console: the playground (run code, stream its output, progress, result
// and plots; history) and the monitor (admins: running sandboxes with live CPU and
// memory, hosts, queue, cancel, policies). Plain browser JavaScript over the public API;
// the editor is CodeMirror (window.HatcheryEditor, from editor.js).
//
// Everything shown comes from sandboxes or other users: it is put in the page as text
// (textContent) and never as HTML.
(function () {
  'use strict';

  const TOKEN_KEY = 'hatchery.token';
  const TAB_KEY = 'hatchery.tab';
  const CURRENT_KEY = 'hatchery.current';
  const CODE_KEY = 'hatchery.code.'; // + execution id: the code, for the history
  const DRAFT_KEY = 'hatchery.draft.'; // + language
  const MAX_OUTPUT_CHARS = 2 << 20; // what the page keeps of one run's output
  const MAX_TABLE_ROWS = 200;
  const QUEUE_RETRIES = 5;
  const MAX_PREVIEW_BYTES = 64 << 10; // text artifacts shown in the page up to this size

  const $ = (id) => document.getElementById(id);

  // h('tag', {attr: value, onclick: fn}, child, ...): an element; strings become text.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'class') el.className = v;
      else if (k === 'text') el.textContent = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function svg(tag, attrs) {
    const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    return el;
  }

  function newId() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  }

  const fmtBytes = (n) => {
    if (n === null || n === undefined) return '–';
    if (n < 1024) return n + ' B';
    if (n < 1 << 20) return (n / 1024).toFixed(1) + ' KiB';
    if (n < 1 << 30) return (n / (1 << 20)).toFixed(1) + ' MiB';
    return (n / (1 << 30)).toFixed(2) + ' GiB';
  };
  const fmtMs = (ms) => {
    if (ms === null || ms === undefined) return '–';
    if (ms < 10) return ms.toFixed(2) + ' ms';
    if (ms < 1000) return Math.round(ms) + ' ms';
    if (ms < 120000) return (ms / 1000).toFixed(1) + ' s';
    return Math.floor(ms / 60000) + ' min ' + Math.round((ms % 60000) / 1000) + ' s';
  };
  const fmtTime = (at) => new Date(at).toLocaleTimeString();
  const fmtWhen = (at) => {
    const d = new Date(at);
    const today = new Date();
    return d.toDateString() === today.toDateString() ? d.toLocaleTimeString() : d.toLocaleString();
  };

  // ------------------------------------------------------------------ WebSockets

  // Reconnection delay after `retries` failed attempts: 0.5 s doubling up to 10 s.
  const backoff = (retries) => Math.min(10000, 500 * Math.pow(2, retries));
  const reconnecting = (delay) => 'reconnecting in ' + Math.round(delay / 100) / 10 + ' s';

  // Hands every JSON message of `ws` to `handle` (anything else is ignored).
  function onJson(ws, handle) {
    ws.onmessage = (m) => {
      let value;
      try {
        value = JSON.parse(m.data);
      } catch (_) {
        return;
      }
      handle(value);
    };
  }

  // ------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
    describe() {
      return this.message + (this.code ? ' (' + this.code + ', HTTP ' + this.status + ')' : '');
    }
  }

  const session = { token: null, me: null };

  async function api(method, path, body) {
    const headers = {};
    if (session.token) headers.Authorization = 'Bearer ' + session.token;
    const init = { method, headers };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let r;
    try {
      r = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, 'network', 'The platform cannot be reached (' + e.message + ')');
    }
    if (r.ok) {
      const type = r.headers.get('Content-Type') || '';
      return type.startsWith('application/json') ? r.json() : r;
    }
    let code = '', message = 'HTTP ' + r.status;
    try {
      const e = (await r.json()).error;
      code = e.code;
      message = e.message;
    } catch (_) { /* not JSON: keep the status */ }
    const retry = parseInt(r.headers.get('Retry-After') || '', 10);
    const err = new ApiError(r.status, code, message, Number.isFinite(retry) ? retry : null);
    if (r.status === 401 && session.token) signedOut('Your token was refused: ' + message);
    throw err;
  }

  function wsUrl(path, params) {
    const q = new URLSearchParams(params);
    q.set('token', session.token);
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return scheme + '//' + location.host + path + '?' + q.toString();
  }

  // ------------------------------------------------------------------ banner

  function banner(text, kind) {
    $('banner-text').textContent = text;
    $('banner').className = kind === 'info' ? 'info' : '';
    $('banner').hidden = !text;
  }
  $('banner-close').addEventListener('click', () => banner(''));

  // ------------------------------------------------------------------ sign-in

  async function signIn(token) {
    session.token = token;
    try {
      session.me = await api('GET', '/v1/me');
    } catch (e) {
      session.token = null;
      throw e;
    }
    localStorage.setItem(TOKEN_KEY, token);
    $('whoami').textContent = session.me.user + ' @ ' + session.me.org + ' (' + session.me.role + ')';
    $('sign-out').hidden = false;
    $('nav-monitor').hidden = session.me.role === 'user';
    setupLanguages(session.me.languages);
    banner('');
    route();
  }

  function signedOut(message) {
    session.token = null;
    session.me = null;
    localStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(CURRENT_KEY);
    playground.detach();
    monitor.stop();
    $('whoami').textContent = '';
    $('sign-out').hidden = true;
    $('nav-monitor').hidden = true;
    showView('signin');
    loadLocalSignIn();
    const err = $('signin-error');
    err.textContent = message || '';
    err.hidden = !message;
  }

  async function loadLocalSignIn() {
    try {
      const info = await api('GET', '/v1/console/sign-in');
      $('local-sign-in').hidden = !info.available;
    } catch (_) {
      $('local-sign-in').hidden = true;
    }
  }

  async function localSignIn(who) {
    try {
      const r = await api('POST', '/v1/console/sign-in', { as: who });
      await signIn(r.token);
    } catch (e) {
      const err = $('signin-error');
      err.textContent = e.describe ? e.describe() : String(e);
      err.hidden = false;
    }
  }

  $('sign-in').addEventListener('click', async () => {
    const token = $('token-input').value.trim();
    const err = $('signin-error');
    if (!token) {
      err.textContent = 'Paste a token first.';
      err.hidden = false;
      return;
    }
    try {
      await signIn(token);
      $('token-input').value = '';
    } catch (e) {
      err.textContent = 'Sign-in failed: ' + (e.describe ? e.describe() : String(e));
      err.hidden = false;
    }
  });
  $('sign-in-user').addEventListener('click', () => localSignIn('user'));
  $('sign-in-admin').addEventListener('click', () => localSignIn('superadmin'));
  $('sign-out').addEventListener('click', () => signedOut(''));

  // ------------------------------------------------------------------ views

  function showView(name) {
    for (const v of ['signin', 'playground', 'monitor']) $('view-' + v).hidden = v !== name;
    $('nav-playground').classList.toggle('active', name === 'playground');
    $('nav-monitor').classList.toggle('active', name === 'monitor');
  }

  function route() {
    if (!session.token) {
      showView('signin');
      return;
    }
    if (location.hash === '#/monitor' && session.me.role !== 'user') {
      showView('monitor');
      monitor.start();
    } else {
      monitor.stop();
      showView('playground');
      playground.attach();
    }
  }
  window.addEventListener('hashchange', route);

  // ------------------------------------------------------------------ the tab's id

  // Each browser tab has its own tab_id (sessionStorage is per tab and survives its
  // reloads). A duplicated tab copies sessionStorage: the tabs ask each other at start
  // and the newcomer takes a fresh id if its id is already in use.
  let tabId = sessionStorage.getItem(TAB_KEY);
  if (!tabId) {
    tabId = 'tab-' + newId();
    sessionStorage.setItem(TAB_KEY, tabId);
  }
  if (window.BroadcastChannel) {
    const tabs = new BroadcastChannel('hatchery-tabs');
    tabs.onmessage = (m) => {
      if (m.data && m.data.hello === tabId) tabs.postMessage({ taken: tabId });
      else if (m.data && m.data.taken === tabId) {
        tabId = 'tab-' + newId();
        sessionStorage.setItem(TAB_KEY, tabId);
        sessionStorage.removeItem(CURRENT_KEY);
        $('tab-id').textContent = tabId.slice(0, 12);
      }
    };
    tabs.postMessage({ hello: tabId });
  }
  $('tab-id').textContent = tabId.slice(0, 12);

  // ------------------------------------------------------------------ one execution

  // Follows one execution's events over the WebSocket, from seq 0 or where it left off:
  // a lost connection is resumed with `after=<last seq>` (nothing missed, nothing
  // twice), with backoff, until the `finished` event.
  class Run {
    constructor(id, onChange) {
      this.id = id;
      this.onChange = onChange;
      this.lastSeq = 0;
      this.events = [];
      this.output = [];
      this.outputChars = 0;
      this.outputCut = false;
      this.progress = null;
      this.usage = null;
      this.artifacts = [];
      this.queuedAt = null;
      this.started = null;
      this.finished = null;
      this.connection = 'connecting';
      this.retries = 0;
      this.closed = false;
      this.ws = null;
      this.timer = null;
      this.connect();
    }

    connect() {
      if (this.closed || this.finished) return;
      const params = this.lastSeq ? { after: String(this.lastSeq) } : {};
      const ws = new WebSocket(wsUrl('/v1/executions/' + encodeURIComponent(this.id) + '/events', params));
      this.ws = ws;
      let opened = false;
      ws.onopen = () => {
        opened = true;
        this.retries = 0;
        this.connection = 'live';
        this.changed();
      };
      onJson(ws, (e) => this.apply(e));
      ws.onclose = (c) => {
        if (this.ws !== ws) return;
        this.ws = null;
        if (this.closed || this.finished) return;
        if (c.code === 1000 && c.reason === 'expired') {
          this.connection = 'gone';
          this.changed();
          return;
        }
        if (!opened) {
          // Refused before it opened: an execution that is not there (any more, or for
          // this user) is not retried.
          api('GET', '/v1/executions/' + encodeURIComponent(this.id)).catch((e) => {
            if (e.status === 404) {
              this.closed = true;
              clearTimeout(this.timer);
              this.connection = 'gone';
              this.changed();
            }
          });
        }
        // Lost (network, server restart, another replica): resume after the last seq.
        const delay = backoff(this.retries++);
        this.connection = reconnecting(delay);
        this.changed();
        this.timer = setTimeout(() => this.connect(), delay);
      };
    }

    // The browser is back online: retry now.
    nudge() {
      if (!this.ws && !this.closed && !this.finished) {
        clearTimeout(this.timer);
        this.connect();
      }
    }

    close() {
      this.closed = true;
      clearTimeout(this.timer);
      if (this.ws) this.ws.close(1000);
      this.ws = null;
    }

    apply(e) {
      if (e.execution_id !== this.id) return;
      if (e.seq === undefined) {
        if (e.type === 'usage') {
          this.usage = e;
          this.changed();
        }
        return;
      }
      if (e.seq <= this.lastSeq) return;
      this.lastSeq = e.seq;
      switch (e.type) {
        case 'queued':
          this.queuedAt = e.at;
          break;
        case 'started':
          this.started = e;
          break;
        case 'stdout':
        case 'stderr':
          this.addOutput(e.type, e.data);
          break;
        case 'progress':
          this.progress = { fraction: e.fraction, message: e.message };
          break;
        case 'artifact':
          this.artifacts.push({ name: e.name, bytes: e.bytes, content_type: e.content_type });
          break;
        case 'finished':
          this.finished = e;
          this.connection = 'done';
          break;
        default:
          break;
      }
      this.changed();
    }

    addOutput(stream, text) {
      if (this.outputCut) return;
      if (this.outputChars + text.length > MAX_OUTPUT_CHARS) {
        text = text.slice(0, Math.max(0, MAX_OUTPUT_CHARS - this.outputChars));
        this.outputCut = true;
      }
      this.outputChars += text.length;
      const last = this.output[this.output.length - 1];
      if (last && last.stream === stream) last.text += text;
      else this.output.push({ stream, text });
    }

    changed() {
      if (this.onChange) this.onChange(this);
    }

    get state() {
      if (this.finished) return this.finished.state;
      if (this.started) return 'running';
      if (this.queuedAt) return 'queued';
      return 'submitted';
    }
  }

  // ------------------------------------------------------------------ the playground

  let editor = null;
  function setupLanguages(languages) {
    const sel = $('language');
    const current = sel.value || localStorage.getItem('hatchery.language') || 'r';
    sel.replaceChildren(...languages.map((l) => h('option', { value: l, text: l === 'r' ? 'R' : l === 'python' ? 'Python' : l })));
    sel.value = languages.includes(current) ? current : languages[0];
  }

  const EXAMPLES = {
    r: '# Ctrl+Enter runs the code\nfor (i in 1:5) {\n  progress(i / 5, paste("step", i))\n  cat("step", i, "\\n")\n  Sys.sleep(0.2)\n}\nplot(cars, main = "Stopping distance")\nhead(cars)\n',
    python: '# Ctrl+Enter runs the code\nimport hatchery, pandas as pd\nfor i in range(1, 6):\n    hatchery.progress(i / 5, f"step {i}")\n    print("step", i)\npd.DataFrame({"x": [1, 2, 3], "y": [2, 4, 6]})\n',
  };

  const playground = {
    attached: false,
    display: null, // the Run on screen
    tabRuns: new Map(), // id → Run followed in the background (this tab's earlier runs)
    history: [],
    historyTimer: null,

    attach() {
      if (!editor) {
        const lang = $('language').value || 'r';
        editor = window.HatcheryEditor.create($('editor'), {
          doc: localStorage.getItem(DRAFT_KEY + lang) || EXAMPLES[lang] || '',
          language: lang === 'python' ? 'python' : 'r',
          onRun: () => playground.run(),
        });
        let saveTimer = null;
        editor.view.dom.addEventListener('keyup', () => {
          clearTimeout(saveTimer);
          saveTimer = setTimeout(() => localStorage.setItem(DRAFT_KEY + $('language').value, editor.getCode()), 400);
        });
      }
      if (this.attached) return;
      this.attached = true;
      this.refreshHistory();
      this.historyTimer = setInterval(() => this.refreshHistory(), 10000);
      const current = sessionStorage.getItem(CURRENT_KEY);
      if (current && !this.display) this.open(current);
    },

    detach() {
      this.attached = false;
      clearInterval(this.historyTimer);
      if (this.display) this.display.close();
      this.display = null;
      for (const r of this.tabRuns.values()) r.close();
      this.tabRuns.clear();
      $('run-panel').hidden = true;
      $('history').replaceChildren();
    },

    limits() {
      const out = {};
      const num = (id) => {
        const v = $(id).value.trim();
        if (!v) return null;
        const n = Number(v);
        return Number.isFinite(n) ? n : v;
      };
      const mem = num('limit-memory');
      if (mem !== null) out.memory_bytes = typeof mem === 'number' ? Math.round(mem * 1048576) : mem;
      const cpus = num('limit-cpus');
      if (cpus !== null) out.cpus = cpus;
      const t = num('limit-time');
      if (t !== null) out.time_limit_ms = typeof t === 'number' ? Math.round(t * 1000) : t;
      return Object.keys(out).length ? out : undefined;
    },

    async run() {
      if (!session.token) return;
      const code = editor.getCode();
      const language = $('language').value;
      localStorage.setItem(DRAFT_KEY + language, code);
      const body = { language, code, tab_id: tabId };
      const limits = this.limits();
      if (limits) body.limits = limits;
      $('run').disabled = true;
      banner('');
      // The tab's run still going when Run is pressed is the one the platform cancels
      // (the same tab_id). Decided now: its end may reach this page before the answer to
      // the POST does.
      const previous = this.display;
      const replacing = previous && !previous.finished ? previous : null;
      let accepted = null;
      for (let attempt = 1; ; attempt++) {
        try {
          accepted = await api('POST', '/v1/executions', body);
          break;
        } catch (e) {
          if (e.code === 'queue_full' && attempt <= QUEUE_RETRIES) {
            const wait = (e.retryAfter || 2) * 1000;
            banner('The queue is full: retrying in ' + Math.round(wait / 1000) + ' s (attempt ' + attempt + ' of ' + QUEUE_RETRIES + ')…', 'info');
            await new Promise((ok) => setTimeout(ok, wait));
            continue;
          }
          banner('The run was refused: ' + e.describe());
          $('run').disabled = false;
          return;
        }
      }
      banner('');
      $('run').disabled = false;
      try {
        localStorage.setItem(CODE_KEY + accepted.id, code.slice(0, 2000));
      } catch (_) { /* storage full: the history shows no code */ }
      // The replaced run: followed in the background until it has ended, to show how.
      const current = this.display;
      if (replacing && replacing === current) {
        this.supersededId = replacing.id;
        if (replacing.finished) {
          replacing.close();
        } else {
          replacing.onChange = (r) => this.backgroundChanged(r);
          this.tabRuns.set(replacing.id, replacing);
        }
      } else {
        this.supersededId = null;
        if (current) current.close();
      }
      sessionStorage.setItem(CURRENT_KEY, accepted.id);
      this.show(new Run(accepted.id, (r) => this.render(r)));
      this.refreshHistory();
    },

    backgroundChanged(r) {
      if (r.finished) {
        r.close();
        this.tabRuns.delete(r.id);
        this.refreshHistory();
        if (this.display) this.render(this.display);
      }
    },

    open(id) {
      if (this.display && this.display.id === id) return;
      if (this.display && !this.display.finished && !this.tabRuns.has(this.display.id)) {
        this.display.close();
      }
      this.supersededId = null;
      const bg = this.tabRuns.get(id);
      if (bg) {
        this.tabRuns.delete(id);
        bg.onChange = (r) => this.render(r);
        this.show(bg);
      } else {
        this.show(new Run(id, (r) => this.render(r)));
      }
      // Artifacts of an old run are read from its record (its events carry them too).
      this.markSelected();
    },

    show(run) {
      this.display = run;
      $('run-panel').hidden = false;
      $('output').replaceChildren();
      $('artifacts').replaceChildren();
      this.shown = { pieces: 0, chars: 0 };
      this.lastSpan = null;
      this.shownArtifacts = 0;
      this.render(run);
      this.markSelected();
    },

    cancel() {
      const r = this.display;
      if (!r || r.finished) return;
      $('cancel').disabled = true;
      api('POST', '/v1/executions/' + encodeURIComponent(r.id) + '/cancel').catch((e) => banner('Cancel failed: ' + e.describe()));
    },

    render(run) {
      if (run !== this.display) return;
      $('run-id').textContent = run.id;
      const state = run.state;
      const pill = $('run-state');
      pill.textContent = state === 'submitted' ? 'submitting' : state.replace('_', ' ');
      pill.className = 'pill ' + state;
      $('cancel').disabled = !!run.finished;
      const conn = $('connection');
      conn.hidden = run.connection === 'done';
      conn.textContent = run.connection === 'live' ? '● live' : run.connection === 'gone' ? 'no longer on the platform' : '○ ' + run.connection;
      conn.className = 'conn' + (run.connection === 'live' ? ' live' : '');

      // Timeline: queued → started (claim → first statement) → finished.
      const steps = [];
      if (run.queuedAt) steps.push(h('span', { class: 'step' }, 'queued ', h('b', { text: fmtTime(run.queuedAt) })));
      if (run.started) {
        const wait = run.queuedAt ? run.started.at - run.queuedAt : null;
        steps.push(h('span', { class: 'step', id: 'tl-started' }, 'started ', h('b', { text: fmtTime(run.started.at) }),
          ' on ' + run.started.agent,
          wait !== null ? ' · waited ' + fmtMs(wait) : '',
          run.started.start_ms !== null && run.started.start_ms !== undefined ? ' · start latency ' + fmtMs(run.started.start_ms) : ''));
      }
      if (run.finished) {
        steps.push(h('span', { class: 'step', id: 'tl-finished' }, 'finished ', h('b', { text: fmtTime(run.finished.at) }),
          ' · ran ' + fmtMs(run.finished.duration_ms)));
      }
      $('timeline').replaceChildren(...steps);

      // The previous run of this tab, cancelled by this one.
      const sup = $('superseded');
      const prevId = this.supersededId;
      if (prevId) {
        const prev = this.tabRuns.get(prevId);
        const item = this.history.find((x) => x.id === prevId);
        const how = prev ? 'is being cancelled' : item && item.state === 'cancelled' ? 'was cancelled' : 'ended (' + (item ? item.state : '?') + ')';
        sup.textContent = 'This run replaced the tab\'s previous run ' + prevId.slice(0, 8) + '…, which ' + how + '.';
        sup.hidden = false;
      } else {
        sup.hidden = true;
      }

      // Progress.
      if (run.progress) {
        $('progress').hidden = false;
        $('progress-fill').style.width = Math.round(run.progress.fraction * 100) + '%';
        $('progress-fill').dataset.fraction = String(run.progress.fraction);
        $('progress-text').textContent = Math.round(run.progress.fraction * 100) + '%' + (run.progress.message ? ' — ' + run.progress.message : '');
      } else {
        $('progress').hidden = true;
      }

      // Live usage while it runs; the summary once finished.
      const usage = run.finished ? run.finished.usage : run.usage;
      $('usage').textContent = usage
        ? 'CPU ' + fmtMs(usage.cpu_ms) + ' · memory ' + fmtBytes(usage.memory_bytes) + (usage.memory_peak_bytes ? ' (peak ' + fmtBytes(usage.memory_peak_bytes) + ')' : '')
        : '';

      // Output: only what is new is appended (a piece of one stream grows until the
      // other stream writes).
      const out = $('output');
      const stick = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
      const shown = this.shown || (this.shown = { pieces: 0, chars: 0 });
      for (let i = Math.max(0, shown.pieces - 1); i < run.output.length; i++) {
        const piece = run.output[i];
        let span = i < shown.pieces ? this.lastSpan : null;
        if (!span) {
          span = h('span', { class: piece.stream });
          out.append(span);
          this.lastSpan = span;
          shown.pieces = i + 1;
          shown.chars = 0;
        }
        if (piece.text.length > shown.chars) {
          span.append(piece.text.slice(shown.chars));
          shown.chars = piece.text.length;
        }
      }
      if (run.outputCut && !out.querySelector('.note')) {
        out.append(h('span', { class: 'note', text: '\n[the page shows the first ' + fmtBytes(MAX_OUTPUT_CHARS) + ' of the output]' }));
      }
      if (run.finished) {
        const f = run.finished;
        if (f.stdout_truncated || f.stderr_truncated) {
          if (!out.querySelector('.truncated')) out.append(h('span', { class: 'note truncated', text: '\n[output over the limit was cut by the platform]' }));
        }
      }
      if (stick) out.scrollTop = out.scrollHeight;

      // Artifacts as they come.
      for (; this.shownArtifacts < run.artifacts.length; this.shownArtifacts++) {
        $('artifacts').append(artifactView(run.id, run.artifacts[this.shownArtifacts]));
      }

      // The result.
      const res = $('result');
      if (run.finished && res.dataset.run !== run.id) {
        res.dataset.run = run.id;
        res.replaceChildren(resultView(run.finished));
        this.refreshHistory();
      } else if (!run.finished) {
        res.dataset.run = '';
        res.replaceChildren();
      }
    },

    async refreshHistory() {
      if (!session.token) return;
      let list;
      try {
        list = (await api('GET', '/v1/executions?limit=50')).executions;
      } catch (e) {
        return; // shown when the user acts; the next refresh tries again
      }
      this.history = list;
      const items = list.map((x) => {
        const code = localStorage.getItem(CODE_KEY + x.id);
        const first = code ? code.split('\n').find((l) => l.trim() && !l.trim().startsWith('#')) || code.split('\n')[0] : '';
        return h('li', { 'data-id': x.id, 'data-state': x.state, onclick: () => this.open(x.id) },
          h('div', { class: 'h-line' },
            h('span', { class: 'pill ' + x.state, text: x.state.replace('_', ' ') }),
            h('span', { text: x.language }),
            h('span', { class: 'h-when', text: fmtWhen(x.created_at) }),
            x.tab_id === tabId ? h('span', { class: 'h-tab', text: 'this tab' }) : null),
          h('div', { class: 'h-code', text: first || x.id.slice(0, 13) + '…' }));
      });
      $('history').replaceChildren(...items);
      this.markSelected();
      if (this.display) this.render(this.display);
    },

    markSelected() {
      for (const li of $('history').children) {
        li.classList.toggle('selected', !!this.display && li.dataset.id === this.display.id);
      }
    },
  };

  $('run').addEventListener('click', () => playground.run());
  $('cancel').addEventListener('click', () => playground.cancel());
  $('history-refresh').addEventListener('click', () => playground.refreshHistory());
  $('language').addEventListener('change', () => {
    const lang = $('language').value;
    localStorage.setItem('hatchery.language', lang);
    if (editor) {
      editor.setLanguage(lang === 'python' ? 'python' : 'r');
      const draft = localStorage.getItem(DRAFT_KEY + lang);
      editor.setCode(draft !== null ? draft : EXAMPLES[lang] || '');
    }
  });
  document.addEventListener('keydown', (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === 'Enter' && !$('view-playground').hidden && !(editor && editor.view.hasFocus)) {
      e.preventDefault();
      playground.run();
    }
  });
  window.addEventListener('online', () => {
    if (playground.display) playground.display.nudge();
    monitor.nudge();
  });

  // An artifact: fetched with the token (never a token in a URL), shown inline when it
  // is a raster image, otherwise offered as a download.
  function artifactView(id, a) {
    const url = '/v1/executions/' + encodeURIComponent(id) + '/artifacts/' + encodeURIComponent(a.name);
    const box = h('div', { class: 'artifact', 'data-name': a.name });
    const fetchBlob = async () => {
      const r = await api('GET', url);
      return r.blob();
    };
    const download = async () => {
      try {
        const blob = await fetchBlob();
        const link = h('a', { href: URL.createObjectURL(blob), download: a.name });
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(link.href), 10000);
      } catch (e) {
        banner('Cannot download ' + a.name + ': ' + (e.describe ? e.describe() : e));
      }
    };
    const label = h('div', { class: 'a-name' }, h('span', { text: a.name + ' · ' + fmtBytes(a.bytes) }),
      h('button', { type: 'button', onclick: download, text: 'Download' }));
    if (/^image\/(png|jpeg|gif|webp)$/.test(a.content_type)) {
      const img = h('img', { alt: a.name });
      box.append(img, label);
      fetchBlob().then((blob) => {
        img.src = URL.createObjectURL(blob);
      }).catch((e) => {
        img.replaceWith(h('span', { class: 'error', text: 'cannot load: ' + (e.describe ? e.describe() : e) }));
      });
    } else if (/^(text\/plain|text\/csv|application\/json)/.test(a.content_type) && a.bytes <= MAX_PREVIEW_BYTES) {
      // Plain data is previewed as text.
      const pre = h('pre', { class: 'a-text' });
      box.append(pre, label);
      fetchBlob().then((blob) => blob.text()).then((text) => {
        pre.textContent = text;
      }).catch((e) => {
        pre.replaceWith(h('span', { class: 'error', text: 'cannot load: ' + (e.describe ? e.describe() : e) }));
      });
    } else {
      box.append(label);
    }
    return box;
  }

  // The result: the value (a data frame — rows of one shape — as a table), the error
  // and warnings, why the platform ended it.
  function resultView(f) {
    const parts = [];
    if (f.error_code) parts.push(h('div', { class: 'err', id: 'result-code', text: 'Ended by the platform: ' + f.error_code + (f.error ? ' — ' + f.error : '') }));
    else if (f.error) parts.push(h('div', { class: 'err', id: 'result-error', text: 'Error: ' + f.error }));
    for (const w of f.warnings || []) parts.push(h('div', { class: 'warn', text: 'Warning: ' + w }));
    if (f.value_json !== null && f.value_json !== undefined) {
      let value;
      try {
        value = JSON.parse(f.value_json);
      } catch (_) {
        value = undefined;
      }
      const box = h('div', { class: 'value', id: 'result-value' }, h('strong', { text: 'Value' }));
      const table = value !== undefined ? tableOf(value) : null;
      box.append(table || h('pre', { text: value !== undefined ? JSON.stringify(value, null, 2) : f.value_json }));
      parts.push(box);
    }
    return h('div', {}, parts);
  }

  function tableOf(v) {
    if (!Array.isArray(v) || !v.length || !v.every((r) => r && typeof r === 'object' && !Array.isArray(r))) return null;
    const cols = [];
    for (const r of v.slice(0, MAX_TABLE_ROWS)) for (const k of Object.keys(r)) if (!cols.includes(k)) cols.push(k);
    if (cols.length > 100) return null;
    const cell = (x) => (x === null || x === undefined ? 'NA' : typeof x === 'object' ? JSON.stringify(x) : String(x));
    const rows = v.slice(0, MAX_TABLE_ROWS).map((r) => h('tr', {}, cols.map((c) => h('td', { text: cell(r[c]) }))));
    const t = h('table', { class: 'value-table' }, h('thead', {}, h('tr', {}, cols.map((c) => h('th', { text: c })))), h('tbody', {}, rows));
    if (v.length > MAX_TABLE_ROWS) return h('div', {}, t, h('p', { class: 'hint', text: 'first ' + MAX_TABLE_ROWS + ' of ' + v.length + ' rows' }));
    return t;
  }

  // ------------------------------------------------------------------ the monitor

  const POLICY_FIELDS = [
    ['memory_bytes', 'Memory (bytes)'],
    ['cpus', 'CPUs'],
    ['pids', 'Processes'],
    ['time_limit_ms', 'Time limit (ms)'],
    ['max_parallel', 'Runs at once per user'],
    ['warm_pool_size', 'Warm sandboxes'],
    ['max_artifacts', 'Artifacts per run'],
    ['max_artifact_bytes', 'Artifact bytes per run'],
    ['groups', 'Host groups (comma-separated)', 'list'],
  ];
  const isList = (k) => POLICY_FIELDS.some(([f, , kind]) => f === k && kind === 'list');
  const policyText = (k, v) => (v === null || v === undefined ? '' : isList(k) ? v.join(', ') : String(v));

  const monitor = {
    running: false,
    ws: null,
    retries: 0,
    timer: null,
    poll: null,
    hosts: new Map(), // agent → {status, at}
    samples: new Map(), // execution → [{at, cpu_ms, memory_bytes}]
    records: [],

    start() {
      if (this.running) return;
      this.running = true;
      if (!$('policy-org').value) $('policy-org').value = session.me.org;
      this.connect();
      this.refresh();
      this.poll = setInterval(() => this.refresh(), 1000);
      this.renderTick = setInterval(() => this.render(), 1000);
    },

    stop() {
      this.running = false;
      clearInterval(this.poll);
      clearInterval(this.renderTick);
      clearTimeout(this.timer);
      if (this.ws) this.ws.close(1000);
      this.ws = null;
      // What another sign-in must not see.
      this.hosts.clear();
      this.samples.clear();
      this.records = [];
      for (const row of (this.rows || new Map()).values()) row.tr.remove();
      this.rows = new Map();
      this.hostRows = new Map();
      $('hosts').tBodies[0].replaceChildren();
      $('groups').tBodies[0].replaceChildren();
      $('groups-box').hidden = true;
      this.groupsAt = 0;
    },

    nudge() {
      if (this.running && !this.ws) {
        clearTimeout(this.timer);
        this.connect();
      }
    },

    connect() {
      const ws = new WebSocket(wsUrl('/v1/admin/monitor', {}));
      this.ws = ws;
      ws.onopen = () => {
        this.retries = 0;
        $('monitor-conn').textContent = '● live';
        $('monitor-conn').className = 'conn live';
      };
      onJson(ws, (s) => this.status(s));
      ws.onclose = () => {
        if (this.ws !== ws) return;
        this.ws = null;
        if (!this.running) return;
        const delay = backoff(this.retries++);
        $('monitor-conn').textContent = '○ ' + reconnecting(delay);
        $('monitor-conn').className = 'conn';
        this.timer = setTimeout(() => this.connect(), delay);
      };
    },

    status(s) {
      // The groups' figures come in their own messages; the table reads the groups view.
      if (s.kind === 'groups') return;
      const now = Date.now();
      this.hosts.set(s.agent, { status: s, at: now });
      for (const sb of s.sandboxes || []) {
        const series = this.samples.get(sb.execution_id) || [];
        const last = series[series.length - 1];
        if (!last || last.cpu_ms !== sb.usage.cpu_ms || now - last.at > 900) {
          series.push({ at: now, cpu_ms: sb.usage.cpu_ms, memory_bytes: sb.usage.memory_bytes, host: s.agent });
        }
        while (series.length > 61) series.shift();
        this.samples.set(sb.execution_id, series);
      }
      this.render();
    },

    async refresh() {
      if (session.me.role === 'superadmin') this.refreshGroups();
      try {
        this.records = (await api('GET', '/v1/admin/executions')).executions;
      } catch (e) {
        return;
      }
      const live = new Set(this.records.map((r) => r.id));
      for (const id of this.samples.keys()) if (!live.has(id)) this.samples.delete(id);
      this.render();
    },

    // CPU use (fraction of one core) between consecutive samples.
    cpuSeries(id) {
      const s = this.samples.get(id) || [];
      const out = [];
      for (let i = 1; i < s.length; i++) {
        const dt = s[i].at - s[i - 1].at;
        if (dt > 0) out.push(Math.max(0, (s[i].cpu_ms - s[i - 1].cpu_ms) / dt));
      }
      return out;
    },

    render() {
      if (!this.running) return;
      const now = Date.now();
      const queued = this.records.filter((r) => r.state === 'queued').length;
      const running = this.records.filter((r) => r.state === 'running');
      $('queue-length').textContent = String(queued);
      $('running-count').textContent = String(running.length);
      // Rows are kept by execution and updated in place, so a click on Cancel is never
      // lost to a refresh between the press and the release.
      const body = $('sandboxes').tBodies[0];
      const rows = this.rows || (this.rows = new Map());
      const live = new Set();
      this.records.forEach((r, index) => {
        live.add(r.id);
        let row = rows.get(r.id);
        if (!row) {
          const cells = Array.from({ length: 8 }, () => h('td'));
          const cancel = h('button', { type: 'button', class: 'danger cancel', text: 'Cancel' });
          cancel.addEventListener('click', () => this.cancel(r.id, cancel));
          row = { tr: h('tr', { 'data-id': r.id }, cells, h('td', {}, cancel)), cells };
          rows.set(r.id, row);
        }
        const series = this.cpuSeries(r.id);
        const cpuNow = series.length ? series[series.length - 1] : null;
        const samples = this.samples.get(r.id) || [];
        const mem = r.usage ? r.usage.memory_bytes : samples.length ? samples[samples.length - 1].memory_bytes : null;
        const limitMem = r.limits.memory_bytes;
        const elapsed = r.started_at ? now - r.started_at : null;
        const limitMs = r.limits.time_limit_ms;
        const c = row.cells;
        row.tr.dataset.state = r.state;
        c[0].replaceChildren(h('code', { text: r.id.slice(0, 8) }), ' ', h('span', { class: 'hint', text: r.language }));
        c[1].textContent = r.user;
        c[2].textContent = r.org;
        c[3].textContent = r.agent || '–';
        c[4].replaceChildren(h('span', { class: 'pill ' + r.state, text: r.state }));
        c[5].replaceChildren(elapsed !== null ? meter(elapsed / limitMs, elapsed > 0.8 * limitMs) : '', elapsed !== null ? fmtMs(elapsed) + ' / ' + fmtMs(limitMs) : 'waiting');
        c[6].className = 'cpu';
        c[6].dataset.cpu = cpuNow === null ? '' : cpuNow.toFixed(3);
        c[6].replaceChildren(cpuNow === null ? '–' : Math.round(cpuNow * 100) + '%', sparkline(series));
        c[7].className = 'mem';
        c[7].dataset.mem = mem === null ? '' : String(mem);
        c[7].replaceChildren(mem !== null ? meter(mem / limitMem, mem > 0.8 * limitMem) : '', mem !== null ? fmtBytes(mem) + ' / ' + fmtBytes(limitMem) : '–');
        if (body.children[index] !== row.tr) body.insertBefore(row.tr, body.children[index] || null);
      });
      for (const [id, row] of rows) {
        if (!live.has(id)) {
          row.tr.remove();
          rows.delete(id);
        }
      }
      $('sandboxes-empty').hidden = this.records.length > 0;

      // Host rows are kept by agent and updated in place too: their buttons stay the
      // same elements across refreshes, so a press is never lost to a re-render.
      const hostBody = $('hosts').tBodies[0];
      const hostRows = this.hostRows || (this.hostRows = new Map());
      const agents = [...this.hosts.keys()].sort((a, b) => a.localeCompare(b));
      agents.forEach((agent, index) => {
        const { status: s, at } = this.hosts.get(agent);
        let row = hostRows.get(agent);
        if (!row) {
          const cells = Array.from({ length: 10 }, () => h('td'));
          cells[6].className = 'machine';
          const actions = h('td', { class: 'actions' });
          const buttons = new Map();
          // Superadmins cordon, drain and resume hosts.
          if (session.me.role === 'superadmin') {
            for (const [label, to] of [['Cordon', 'cordoned'], ['Drain', 'draining'], ['Resume', 'ready']]) {
              const button = h('button', { type: 'button', class: 'small host-' + to, text: label });
              button.addEventListener('click', () => this.setHostState(agent, to, button));
              buttons.set(to, button);
              actions.append(button);
            }
          }
          row = { tr: h('tr', { 'data-agent': agent }, cells, actions), cells, buttons, state: null };
          hostRows.set(agent, row);
        }
        const age = now - at;
        const state = age > 30000 ? 'not reporting' : (s.state || (s.draining ? 'draining' : 'ready'));
        let cpu = 0, mem = 0;
        for (const sb of s.sandboxes || []) {
          const series = this.cpuSeries(sb.execution_id);
          if (series.length) cpu += series[series.length - 1];
          mem += sb.usage.memory_bytes;
        }
        // What the limits of what runs take of what the host has for executions.
        const alloc = s.allocatable || { memory_bytes: 0, cpus: 0 };
        let limMem = 0, limCpu = 0;
        for (const sb of s.sandboxes || []) {
          limMem += (sb.limits || {}).memory_bytes || 0;
          limCpu += (sb.limits || {}).cpus || 0;
        }
        const load = s.load || {};
        const machine = load.memory_total_bytes
          ? 'CPU ' + Math.round((load.cpu_busy || 0) * 100) + '% · memory ' + fmtBytes(load.memory_used_bytes) + ' / ' + fmtBytes(load.memory_total_bytes) +
            ' · stalls ' + (load.cpu_pressure || 0).toFixed(1) + '% CPU, ' + (load.memory_pressure || 0).toFixed(1) + '% memory'
          : '–';
        const c = row.cells;
        row.tr.dataset.state = state;
        c[0].textContent = s.agent;
        c[1].textContent = s.group || '–';
        c[2].replaceChildren(h('span', { class: 'pill ' + (state === 'ready' ? 'succeeded' : 'cancelled'), text: state }));
        c[3].replaceChildren(meter(s.running / Math.max(1, s.capacity), s.running >= s.capacity), s.running + ' / ' + s.capacity);
        c[4].replaceChildren(alloc.memory_bytes ? meter(limMem / alloc.memory_bytes, limMem > 0.8 * alloc.memory_bytes) : '',
          alloc.memory_bytes ? fmtBytes(limMem) + ' / ' + fmtBytes(alloc.memory_bytes) + ', ' + (Math.round(limCpu * 100) / 100) + ' / ' + alloc.cpus + ' cpus' : '–');
        c[5].textContent = (s.warm || []).map(([l, n]) => l + ' ' + n).join(', ') || '–';
        c[6].textContent = machine;
        c[7].textContent = Math.round(cpu * 100) + '%';
        c[8].textContent = fmtBytes(mem);
        c[9].textContent = Math.round(age / 1000) + ' s ago';
        // A state change re-enables the buttons a press disabled.
        if (row.state !== state) {
          row.state = state;
          for (const [to, button] of row.buttons) {
            button.hidden = to === state || state === 'not reporting';
            button.disabled = false;
          }
        }
        if (hostBody.children[index] !== row.tr) hostBody.insertBefore(row.tr, hostBody.children[index] || null);
      });
      for (const [agent, row] of hostRows) {
        if (!this.hosts.has(agent)) {
          row.tr.remove();
          hostRows.delete(agent);
        }
      }
    },

    // The host groups (superadmins): what each has, what runs, what waits for it and
    // the room kept in it for active users, every few seconds (the view reads the
    // queue). Rows are replaced whole: they have no buttons to keep.
    async refreshGroups() {
      const now = Date.now();
      if (now - (this.groupsAt || 0) < 4000) return;
      this.groupsAt = now;
      let groups;
      try {
        groups = (await api('GET', '/v1/admin/groups')).groups;
      } catch (e) {
        return;
      }
      if (!this.running) return;
      $('groups-box').hidden = groups.length === 0;
      const res = (r) => fmtBytes(r.memory_bytes) + ', ' + (Math.round(r.cpus * 100) / 100) + ' cpus';
      $('groups').tBodies[0].replaceChildren(...groups.map((g) => {
        const hosts = g.hosts.ready + g.hosts.cordoned + g.hosts.draining;
        const a = g.autoscaler || { provisioning: 0, terminating: 0, pending: 0 };
        const states = [['ready', g.hosts.ready], ['cordoned', g.hosts.cordoned], ['draining', g.hosts.draining],
          ['on the way', a.provisioning], ['leaving', a.terminating]]
          .filter(([, n]) => n > 0).map(([s, n]) => n + ' ' + s).join(', ');
        const kept = g.reserved.executions
          ? g.reserved.executions + ' runs (' + res(g.reserved.need) + ') for ' + g.reserved.active_users.join(', ')
          : '–';
        return h('tr', { 'data-group': g.name },
          h('td', {}, h('strong', { text: g.name }), ' ', h('span', { class: 'hint', text: g.provider })),
          h('td', { text: res(g.shape) }),
          h('td', { class: 'hosts', text: hosts + (states ? ' (' + states + ')' : '') + ' · ' + g.min + '–' + g.max }),
          h('td', {}, g.capacity.memory_bytes ? meter(g.used.memory_bytes / g.capacity.memory_bytes, g.used.memory_bytes > 0.8 * g.capacity.memory_bytes) : '',
            g.capacity.memory_bytes ? res(g.used) + ' / ' + res(g.capacity) : '–'),
          h('td', { text: String(g.running) }),
          h('td', { class: 'queued', text: (g.queued.executions ? g.queued.executions + ' (' + res(g.queued.need) + ')' : '0') +
            (a.pending ? ' · ' + a.pending + ' waiting for a host' : '') }),
          h('td', { class: 'reserved', text: kept }));
      }));
    },

    async setHostState(agent, state, button) {
      button.disabled = true;
      try {
        await api('PUT', '/v1/admin/hosts/' + encodeURIComponent(agent) + '/state', { state });
        banner(agent + ' asked to be ' + state + '; it acts on it at its next heartbeat', 'info');
      } catch (e) {
        banner('Changing ' + agent + ' failed: ' + e.describe());
        button.disabled = false;
      }
    },

    async cancel(id, button) {
      button.disabled = true;
      try {
        await api('POST', '/v1/executions/' + encodeURIComponent(id) + '/cancel');
        banner('Cancel sent to ' + id.slice(0, 8) + '…', 'info');
      } catch (e) {
        banner('Cancel failed: ' + e.describe());
      }
      this.refresh();
    },
  };

  function meter(fraction, hot) {
    const f = Math.max(0, Math.min(1, fraction || 0));
    return h('span', { class: 'meter' + (hot ? ' hot' : '') }, h('span', { style: 'width:' + Math.round(f * 100) + '%' }));
  }

  function sparkline(values) {
    const w = 80, hgt = 18;
    const s = svg('svg', { class: 'spark', width: w, height: hgt, viewBox: '0 0 ' + w + ' ' + hgt });
    if (values.length < 2) return s;
    const max = Math.max(1, ...values);
    const pts = values.map((v, i) => (i * w / (values.length - 1)).toFixed(1) + ',' + (hgt - 1 - (v / max) * (hgt - 2)).toFixed(1));
    s.append(svg('polyline', { points: pts.join(' ') }));
    return s;
  }

  // ------------------------------------------------------------------ policies

  const policyForm = {
    loaded: null,

    scope() {
      return document.querySelector('input[name=scope]:checked').value;
    },

    path() {
      const org = encodeURIComponent($('policy-org').value.trim());
      if (this.scope() === 'user') return '/v1/admin/orgs/' + org + '/users/' + encodeURIComponent($('policy-user').value.trim()) + '/policy';
      return '/v1/admin/orgs/' + org + '/policy';
    },

    clearErrors() {
      $('policy-error').hidden = true;
      for (const el of document.querySelectorAll('#policy-fields .field-error')) el.remove();
      for (const el of document.querySelectorAll('#policy-fields input')) el.classList.remove('invalid');
    },

    showError(e) {
      const msg = e.describe ? e.describe() : String(e);
      // The API names the field (`policy.memory_bytes must not be negative`): show the
      // message under it.
      const m = /policy\.([a-z_]+)/.exec(e.message || '') || /`([a-z_]+)`/.exec(e.message || '') || /^(groups):/.exec(e.message || '');
      const input = m ? $('policy-' + m[1]) : null;
      if (input) {
        input.classList.add('invalid');
        input.parentElement.append(h('span', { class: 'field-error', text: msg }));
        input.focus();
      } else {
        $('policy-error').textContent = msg;
        $('policy-error').hidden = false;
      }
    },

    render(view) {
      const policy = view.policy || {};
      $('policy-fields').replaceChildren(...POLICY_FIELDS.map(([k, label]) =>
        h('label', {}, label, h('input', { id: 'policy-' + k, name: k, value: policyText(k, policy[k]), placeholder: isList(k) ? 'inherit (any)' : 'inherit', autocomplete: 'off' }))));
      const eff = $('policy-effective');
      if (view.effective) {
        eff.hidden = false;
        eff.replaceChildren(h('strong', { text: 'Effective for the user\'s next run: ' }),
          POLICY_FIELDS.map(([k]) => k + ' ' + (isList(k) ? policyText(k, view.effective[k]) || 'any' : view.effective[k])).join(' · '),
          view.capped_by_org && view.capped_by_org.length ? h('div', { text: 'Capped by the org: ' + view.capped_by_org.join(', ') }) : '');
      } else {
        eff.hidden = true;
      }
      $('policy-save').disabled = false;
    },

    async load() {
      this.clearErrors();
      $('policy-status').textContent = '';
      try {
        const view = await api('GET', this.path());
        this.loaded = this.path();
        this.render(view);
      } catch (e) {
        $('policy-save').disabled = true;
        $('policy-fields').replaceChildren();
        this.showError(e);
      }
    },

    async save() {
      this.clearErrors();
      $('policy-status').textContent = '';
      const body = {};
      for (const [k] of POLICY_FIELDS) {
        const v = $('policy-' + k).value.trim();
        if (!v) continue;
        if (isList(k)) {
          body[k] = v.split(',').map((x) => x.trim()).filter(Boolean);
          continue;
        }
        const n = Number(v);
        // Anything that is not a number goes as typed: the API says what is wrong.
        body[k] = Number.isFinite(n) ? n : v;
      }
      try {
        const view = await api('PUT', this.path(), body);
        this.render(view);
        $('policy-status').textContent = 'Saved ' + new Date().toLocaleTimeString();
      } catch (e) {
        this.showError(e);
      }
    },
  };

  for (const radio of document.querySelectorAll('input[name=scope]')) {
    radio.addEventListener('change', () => {
      $('policy-user-label').hidden = policyForm.scope() !== 'user';
      $('policy-save').disabled = true;
      $('policy-fields').replaceChildren();
      $('policy-effective').hidden = true;
    });
  }
  $('policy-load').addEventListener('click', () => policyForm.load());
  $('policy-save').addEventListener('click', () => policyForm.save());

  // ------------------------------------------------------------------ start

  const saved = localStorage.getItem(TOKEN_KEY);
  if (saved) {
    signIn(saved).catch((e) => signedOut(e.status === 0 ? e.describe() : 'Please sign in again: ' + e.describe()));
  } else {
    signedOut('');
  }
})();

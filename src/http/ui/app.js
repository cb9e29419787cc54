// The operations page: the list API for what exists, the change stream for what changes, the
// health counters on top. Plain DOM and fetch; every value from the API goes in as text.
'use strict';

const KEY_STORAGE = 'callops.apiKey';
const MAX_ROWS = 1000;
const PAGE_SIZE = 100;
const HEALTH_EVERY_MS = 5000;
const AGES_EVERY_MS = 15000;

const $ = (selector) => document.querySelector(selector);

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || '',
  filter: {},
  operations: new Map(),
  rows: new Map(),
  nextLink: null,
  generation: 0,
  abort: null,
  lastEventId: null,
  openId: null,
};

class ApiFailure extends Error {
  constructor(status, code, message) {
    super(`${code}: ${message}`);
    this.status = status;
    this.code = code;
  }
}

function headers(extra) {
  const all = Object.assign({ Accept: 'application/json' }, extra || {});
  if (state.key) all['api-key'] = state.key;
  return all;
}

async function failure(response) {
  let code = `HTTP${response.status}`;
  let message = response.statusText || 'request failed';
  try {
    const body = await response.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiFailure(response.status, code, message);
}

async function api(path, signal) {
  const response = await fetch(path, { headers: headers(), signal, cache: 'no-store' });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// --- messages ---

function showError(text) {
  const box = $('#error');
  box.textContent = text;
  box.hidden = !text;
}

function setLive(stateName, text) {
  const live = $('#live');
  if (live.dataset.state !== stateName) live.dataset.state = stateName;
  if (live.textContent !== text) live.textContent = text;
}

function needKey(refused) {
  stopStream();
  $('#key-panel').hidden = false;
  $('#forget-key').hidden = !state.key;
  setLive('down', 'Waiting for an API key');
  showError(refused
    ? `The API key was refused (${refused.code}: ${refused.message}). Enter a valid key.`
    : 'This service needs an API key.');
  const input = $('#api-key');
  input.value = '';
  input.focus();
}

function handleFailure(error) {
  if (error.name === 'AbortError') return true;
  if (error instanceof ApiFailure && error.status === 401) {
    needKey(state.key ? error : null);
    return true;
  }
  showError(error instanceof ApiFailure ? error.message : `Cannot reach callops: ${error.message}`);
  return false;
}

// --- formatting ---

function callOf(op) {
  return op.callConnectionId || op.callId || '';
}

function outcomeOf(op) {
  if (op.error) return `${op.error.code}: ${op.error.message}`;
  if (op.result) {
    const parts = [op.result.code, op.result.subCode].filter((part) => part !== undefined && part !== null);
    return [parts.join('/'), op.result.message].filter(Boolean).join(' ');
  }
  return '';
}

function age(iso, now) {
  const seconds = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds} s`;
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  if (hours < 48) return `${hours} h`;
  return `${Math.floor(hours / 24)} d`;
}

function cell(text, className) {
  const td = document.createElement('td');
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function mark(text, title) {
  const span = document.createElement('span');
  span.className = 'mark';
  span.textContent = text;
  span.title = title;
  return span;
}

// --- the list ---

function newer(a, b) {
  return Date.parse(a.lastUpdatedDateTime) > Date.parse(b.lastUpdatedDateTime);
}

function wanted(op) {
  return !state.filter.status || op.status === state.filter.status;
}

function order(a, b) {
  const byTime = Date.parse(b.createdDateTime) - Date.parse(a.createdDateTime);
  return byTime !== 0 ? byTime : (a.id < b.id ? 1 : a.id > b.id ? -1 : 0);
}

function fillStatus(td, op) {
  td.className = `status status-${op.status}`;
  td.replaceChildren();
  const link = document.createElement('a');
  link.href = `#/operations/${op.id}`;
  link.textContent = op.status;
  link.setAttribute('aria-label', `${op.status} ${op.kind} on ${callOf(op)}: open`);
  td.append(link);
  if (op.late) td.append(mark('late', 'the final callback came after a provisional outcome and replaced it'));
  if (op.reconciled) td.append(mark('reconciled', 'settled from what the platform said, without its callback'));
}

function renderRow(op, now) {
  let tr = state.rows.get(op.id);
  if (!tr) {
    tr = document.createElement('tr');
    tr.dataset.id = op.id;
    tr.append(cell(''), cell(op.kind), cell(callOf(op), 'call'), cell(op.context, 'context'),
      cell('', 'age'), cell('', 'outcome'));
    state.rows.set(op.id, tr);
  }
  const cells = tr.children;
  fillStatus(cells[0], op);
  setText(cells[4], age(op.createdDateTime, now));
  cells[4].title = op.createdDateTime;
  setText(cells[5], outcomeOf(op));
  return tr;
}

function place(op, tr) {
  const body = $('#operations tbody');
  // Rows are newest first; a new row usually goes at the top.
  let before = null;
  for (const row of body.children) {
    if (row === tr) continue;
    const other = state.operations.get(row.dataset.id);
    if (other && order(op, other) < 0) { before = row; break; }
  }
  if (tr.parentNode !== body || tr.nextSibling !== before) body.insertBefore(tr, before);
}

function drop(id) {
  const tr = state.rows.get(id);
  if (tr) tr.remove();
  state.rows.delete(id);
  state.operations.delete(id);
}

function upsert(op, fromStream) {
  const known = state.operations.get(op.id);
  if (known && (newer(known, op) || (!fromStream && !newer(op, known)))) return;
  if (!wanted(op)) {
    drop(op.id);
  } else {
    state.operations.set(op.id, op);
    place(op, renderRow(op, Date.now()));
    while (state.rows.size > MAX_ROWS) {
      const last = $('#operations tbody').lastElementChild;
      if (!last) break;
      drop(last.dataset.id);
    }
  }
  if (state.openId === op.id) renderDetail(op);
  summarize();
}

function summarize() {
  const count = state.rows.size;
  setText($('#operations-summary'), count === 0
    ? 'No operations match.'
    : `${count} operation${count === 1 ? '' : 's'} shown, newest first; live.`);
  $('#more').hidden = !state.nextLink;
}

function refreshAges() {
  const now = Date.now();
  for (const [id, tr] of state.rows) {
    const op = state.operations.get(id);
    if (op) setText(tr.children[4], age(op.createdDateTime, now));
  }
}

function query(withStatus) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(state.filter)) {
    if (value && (withStatus || name !== 'status')) params.set(name, value);
  }
  return params;
}

async function loadPage(path, generation) {
  const page = await api(path, state.abort ? state.abort.signal : undefined);
  if (generation !== state.generation) return;
  for (const op of page.value || []) upsert(op, false);
  state.nextLink = page.nextLink || null;
  summarize();
}

// --- the change stream, read with fetch so the API key travels in a header ---

function stopStream() {
  state.generation += 1;
  if (state.abort) state.abort.abort();
  state.abort = null;
}

function parseEvents(buffer, onEvent) {
  const text = buffer.replace(/\r\n?/g, '\n');
  const blocks = text.split('\n\n');
  const rest = blocks.pop();
  for (const block of blocks) {
    const event = { event: 'message', data: [], id: null };
    for (const line of block.split('\n')) {
      if (!line || line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? '' : line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') event.event = value;
      else if (field === 'data') event.data.push(value);
      else if (field === 'id') event.id = value;
    }
    if (event.data.length || event.id !== null) onEvent(event);
  }
  return rest;
}

async function runStream(generation, signal) {
  let delay = 1000;
  let listed = false;
  while (generation === state.generation) {
    const extra = state.lastEventId ? { 'Last-Event-ID': state.lastEventId } : {};
    try {
      const response = await fetch(`/v1/operations:stream?${query(false)}`, {
        headers: headers(Object.assign({ Accept: 'text/event-stream' }, extra)),
        signal,
        cache: 'no-store',
      });
      if (!response.ok) throw await failure(response);
      setLive('live', 'Live');
      showError('');
      delay = 1000;
      if (!listed) {
        // The stream is open before the list is read, so nothing falls between them.
        await loadPage(`/v1/operations?${query(true)}&maxpagesize=${PAGE_SIZE}`, generation);
        listed = true;
      }
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      let reconnectNow = false;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = parseEvents(buffer + value, (event) => {
          if (event.id) state.lastEventId = event.id;
          const data = event.data.join('\n');
          if (event.event === 'operation.changed' || event.event === 'operation.settled') {
            upsert(JSON.parse(data), true);
          } else if (event.event === 'reset') {
            // Changes were missed: read the list again.
            loadPage(`/v1/operations?${query(true)}&maxpagesize=${PAGE_SIZE}`, generation)
              .catch(handleFailure);
          } else if (event.event === 'dropped') {
            reconnectNow = true;
          }
        });
        if (reconnectNow) break;
      }
      if (generation !== state.generation) return;
      setLive('down', 'Reconnecting…');
    } catch (error) {
      if (generation !== state.generation || handleFailure(error)) return;
      setLive('down', 'Reconnecting…');
    }
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 30000);
  }
}

function start() {
  stopStream();
  const generation = state.generation;
  state.abort = new AbortController();
  state.lastEventId = null;
  state.nextLink = null;
  state.operations.clear();
  state.rows.clear();
  $('#operations tbody').replaceChildren();
  setText($('#operations-summary'), 'Loading…');
  setLive('connecting', 'Connecting…');
  runStream(generation, state.abort.signal);
}

// --- the detail view ---

function eventRows(tbody, events) {
  tbody.replaceChildren(...events.map((event) => {
    const tr = document.createElement('tr');
    tr.append(cell(event.receivedDateTime), cell(event.type), cell(event.id || ''),
      cell(event.effect, `effect effect-${event.effect}`));
    return tr;
  }));
}

function field(dl, name, value) {
  if (value === undefined || value === null || value === '') return;
  const dt = document.createElement('dt');
  dt.textContent = name;
  const dd = document.createElement('dd');
  dd.textContent = String(value);
  dl.append(dt, dd);
}

function renderDetail(op) {
  setText($('#detail-title'), `${op.kind} · ${op.status}`);
  const dl = $('#detail-fields');
  dl.replaceChildren();
  field(dl, 'Id', op.id);
  field(dl, 'Status', op.status);
  field(dl, 'Kind', op.kind);
  field(dl, op.callConnectionId ? 'Call connection' : 'Graph call', callOf(op));
  field(dl, 'Context', op.context);
  field(dl, 'Created', op.createdDateTime);
  field(dl, 'Last updated', op.lastUpdatedDateTime);
  field(dl, 'Outcome', outcomeOf(op));
  field(dl, 'Graph operation', op.upstreamOperationId);
  field(dl, 'Graph status', op.upstreamStatus);
  if (op.late) field(dl, 'Late', 'the final callback replaced a provisional outcome');
  if (op.reconciled) field(dl, 'Reconciled', 'settled from what the platform said');
  if (op.eventsOmitted) field(dl, 'Events omitted', op.eventsOmitted);
  const events = op.events || [];
  eventRows($('#timeline tbody'), events);
  $('#timeline-empty').hidden = events.length > 0;
  $('#timeline').hidden = events.length === 0;
  const cancelled = op.cancelledOperations || [];
  $('#cancelled-section').hidden = cancelled.length === 0;
  $('#cancelled tbody').replaceChildren(...cancelled.map((item) => {
    const tr = document.createElement('tr');
    const first = document.createElement('td');
    if (item.id) {
      const link = document.createElement('a');
      link.href = `#/operations/${item.id}`;
      link.textContent = item.id;
      first.append(link);
    }
    tr.append(first, cell(item.kind || ''), cell(item.context || ''), cell(item.upstreamOperationId || ''));
    return tr;
  }));
  setText($('#detail-json'), JSON.stringify(op, null, 2));
}

async function openDetail(id) {
  const dialog = $('#detail');
  state.openId = id;
  try {
    const op = await api(`/v1/operations/${encodeURIComponent(id)}`);
    if (state.openId !== id) return;
    renderDetail(op);
    if (!dialog.open) dialog.showModal();
    const path = op.callConnectionId
      ? `/v1/acs/callConnections/${encodeURIComponent(op.callConnectionId)}/events`
      : `/v1/graph/calls/${encodeURIComponent(op.callId)}/events`;
    const page = await api(path);
    if (state.openId !== id) return;
    const events = page.value || [];
    eventRows($('#call-events tbody'), events);
    $('#call-events-empty').hidden = events.length > 0;
    $('#call-events').hidden = events.length === 0;
  } catch (error) {
    state.openId = null;
    if (dialog.open) dialog.close();
    handleFailure(error);
  }
}

function followHash() {
  const match = /^#\/operations\/([0-9a-fA-F-]{36})$/.exec(location.hash);
  if (match) {
    openDetail(match[1]);
  } else if ($('#detail').open) {
    $('#detail').close();
  }
}

// --- the health counters ---

async function loadHealth() {
  try {
    const response = await fetch('/healthz', { cache: 'no-store' });
    if (!response.ok) return;
    const health = await response.json();
    const sum = (pair) => (pair ? (pair.acs || 0) + (pair.graph || 0) : 0);
    const values = {
      operations: health.operations,
      parked: health.parkedCallbacks,
      refused: sum(health.callbacksRefused),
      duplicates: sum(health.callbacksDuplicate),
      longPolls: health.longPolls,
    };
    for (const [name, value] of Object.entries(values)) {
      const dd = document.querySelector(`[data-counter="${name}"]`);
      if (dd && value !== undefined) setText(dd, String(value));
    }
  } catch (_) { /* the live indicator already says when the service is unreachable */ }
}

// --- wiring ---

function readFilter() {
  const form = $('#filters');
  const filter = {};
  for (const [name, value] of new FormData(form)) {
    const trimmed = String(value).trim();
    if (trimmed) filter[name] = trimmed;
  }
  return filter;
}

document.addEventListener('DOMContentLoaded', () => {
  $('#filters').addEventListener('submit', (event) => {
    event.preventDefault();
    if (!event.target.reportValidity()) return;
    state.filter = readFilter();
    start();
  });
  $('#filters').addEventListener('reset', () => {
    setTimeout(() => { state.filter = {}; start(); }, 0);
  });
  $('#key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const input = $('#api-key');
    state.key = input.value.trim();
    input.value = '';
    sessionStorage.setItem(KEY_STORAGE, state.key);
    $('#key-panel').hidden = true;
    $('#forget-key').hidden = false;
    showError('');
    start();
    $('#operations-title').focus();
  });
  $('#forget-key').addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORAGE);
    state.key = '';
    needKey(null);
  });
  $('#more').addEventListener('click', () => {
    if (state.nextLink) loadPage(state.nextLink, state.generation).catch(handleFailure);
  });
  $('#operations tbody').addEventListener('click', (event) => {
    const tr = event.target.closest('tr');
    if (tr && !event.target.closest('a')) location.hash = `#/operations/${tr.dataset.id}`;
  });
  $('#detail-close').addEventListener('click', () => $('#detail').close());
  $('#detail').addEventListener('close', () => {
    state.openId = null;
    if (location.hash) history.replaceState(null, '', location.pathname + location.search);
  });
  window.addEventListener('hashchange', followHash);
  $('#forget-key').hidden = !state.key;
  start();
  followHash();
  loadHealth();
  setInterval(loadHealth, HEALTH_EVERY_MS);
  setInterval(refreshAges, AGES_EVERY_MS);
});

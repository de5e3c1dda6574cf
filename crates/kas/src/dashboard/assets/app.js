// The kas dashboard. Plain JavaScript, no dependencies: everything it shows comes from kas's GraphQL API
// (POST /api/graphql) with the token the user logged in with; /dashboard/api/events says what changed, and
// the page re-queries what it shows. Text from Git or agents is only ever set as text, never as HTML.
'use strict';

const TOKEN_KEY = 'kas-dashboard-token';
const RECONCILE = 'clusterAgentReconcile';

const session = {
  token: sessionStorage.getItem(TOKEN_KEY),
  role: null, // 'viewer' | 'admin'
  kasVersion: '',
  reconcile: null, // true when the server has the clusterAgentReconcile mutation
  live: 'off', // 'off' | 'connecting' | 'live' | 'reconnecting'
  lastUpdate: null,
  stream: null, // AbortController of the event stream
};

// --- DOM helpers ---

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function table(testid, headers, rows, empty) {
  if (rows.length === 0) return h('p', { class: 'empty', 'data-testid': testid + '-empty' }, empty);
  return h('table', { 'data-testid': testid },
    h('thead', {}, h('tr', {}, headers.map((x) => h('th', {}, x)))),
    h('tbody', {}, rows));
}

function badge(text, kind) {
  return h('span', { class: 'badge ' + (kind || String(text).toLowerCase()) }, text);
}

function short(commit) {
  return commit ? commit.slice(0, 12) : '—';
}

function when(rfc3339) {
  if (!rfc3339) return '—';
  const d = new Date(rfc3339);
  return h('time', { datetime: rfc3339, title: rfc3339 }, d.toLocaleString());
}

function numericId(gid) {
  return String(gid).split('/').pop();
}

// --- API ---

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function gql(query, variables) {
  const response = await fetch('/api/graphql', {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: 'Bearer ' + session.token },
    body: JSON.stringify({ query, variables: variables || {} }),
  });
  let body;
  try {
    body = await response.json();
  } catch {
    throw new ApiError('HTTP ' + response.status, response.status);
  }
  if (!response.ok || body.errors) {
    const message = (body.errors || []).map((e) => e.message).join('; ') || 'HTTP ' + response.status;
    throw new ApiError(message, response.status);
  }
  return body.data;
}

const AGENT_FIELDS = `id name projectPath createdAt connected lastSeenAt
  connections { agentVersion connectedAt podNamespace podName }
  configStatus { commitId error updatedAt }`;

// The agent page's "Network alerts" section: the module's state, a forwarding error, the newest alerts.
function networkAlerts(a) {
  const st = a.networkAlertsStatus;
  const facts = st ? h('p', { 'data-testid': 'network-alerts-status' },
    st.state ? badge(st.state.toLowerCase().replace(/_/g, ' '), st.state === 'FOLLOWING' ? 'synced' : 'partial') : '',
    st.message ? ' ' + st.message : '',
    st.forwarding.lastError ? [' ', badge('forwarding failed', 'failed'), ' ', st.forwarding.lastError] : '') : null;
  const rows = a.networkAlerts.map((x) => h('tr', { 'data-testid': 'network-alert-row' },
    h('td', {}, x.policy),
    h('td', {}, x.direction.toLowerCase()),
    h('td', {}, x.source),
    h('td', {}, x.destination),
    h('td', {}, x.port ? `${x.port}/${x.protocol}` : x.protocol),
    h('td', {}, String(x.count)),
    h('td', {}, x.resolved ? badge('resolved', 'unchanged') : badge('firing', 'failed')),
    h('td', {}, when(x.lastSeen))));
  return [facts, table('network-alerts', ['Policy', 'Direction', 'Source', 'Destination', 'Port', 'Count', 'State', 'Last seen'],
    rows, 'No network alerts from this agent.')];
}

// --- pages ---

const pages = {
  async agents() {
    const data = await gql(`{ clusterAgents { ${AGENT_FIELDS} } }`);
    const rows = data.clusterAgents.map((a) => {
      const c = a.connections[0];
      return h('tr', { 'data-testid': 'agent-row', 'data-agent': a.name },
        h('td', {}, h('a', { href: '#/agent/' + numericId(a.id) }, a.name)),
        h('td', {}, a.projectPath),
        h('td', { 'data-testid': 'agent-status' },
          a.connected ? badge('connected') : badge('disconnected'),
          a.connections.length > 1 ? ` ×${a.connections.length}` : ''),
        h('td', { 'data-testid': 'agent-version' }, c ? c.agentVersion : '—'),
        h('td', {}, c ? when(c.connectedAt) : '—'),
        h('td', { 'data-testid': 'agent-last-seen' }, a.connected ? 'now' : when(a.lastSeenAt)),
        h('td', {}, h('code', {}, short(a.configStatus && a.configStatus.commitId)),
          a.configStatus && a.configStatus.error ? [' ', badge('invalid', 'failed')] : ''));
    });
    return [h('h1', {}, 'Agents'),
      table('agents', ['Agent', 'Project', 'Status', 'Version', 'Connected since', 'Last seen', 'Configuration'],
        rows, 'No agents registered yet (kas agent create, or createClusterAgent in GraphQL).')];
  },

  async agent(id) {
    const data = await gql(`query($id: ID!) { clusterAgent(id: $id) { ${AGENT_FIELDS}
      manifestProjects { projectId commitSeen commitSent error updatedAt
        lastSync { commitSeen commitApplied finishedAt outcome message
          objects { resourceKey source result health message } } }
      networkAlerts(first: 50) { id policy direction source destination port protocol count lastSeen resolved }
      networkAlertsStatus { state message forwarding { lastError } } } }`, { id: 'gid://kas/Clusters::Agent/' + id });
    const a = data.clusterAgent;
    if (!a) return [h('h1', {}, 'Agent ' + id), h('p', { class: 'error' }, 'No such agent.')];
    const c = a.connections[0];
    const summary = h('dl', { class: 'facts' },
      h('dt', {}, 'Project'), h('dd', {}, a.projectPath),
      h('dt', {}, 'Status'), h('dd', { 'data-testid': 'agent-status' }, a.connected ? badge('connected') : badge('disconnected')),
      h('dt', {}, 'Version'), h('dd', {}, c ? c.agentVersion : '—'),
      h('dt', {}, 'Connected since'), h('dd', {}, c ? when(c.connectedAt) : '—'),
      h('dt', {}, 'Pod'), h('dd', {}, c && c.podName ? `${c.podNamespace}/${c.podName}` : '—'),
      h('dt', {}, 'Last seen'), h('dd', {}, a.connected ? 'now' : when(a.lastSeenAt)),
      h('dt', {}, 'Configuration commit'), h('dd', {}, h('code', {}, short(a.configStatus && a.configStatus.commitId))));
    const projects = a.manifestProjects.map((p) => projectCard(a, p));
    return [
      h('h1', {}, 'Agent ', h('span', { 'data-testid': 'agent-name' }, a.name)),
      summary,
      a.configStatus && a.configStatus.error ? configError(a.configStatus.error) : null,
      h('div', { class: 'actions' }, reconcileButton(a, null, 'Reconcile all projects now')),
      h('h2', {}, 'Manifest projects'),
      projects.length ? projects : h('p', { class: 'empty' }, 'No manifest project has been read for this agent yet.'),
      h('h2', {}, 'Network alerts'),
      networkAlerts(a),
    ];
  },

  async errors() {
    const data = await gql(`{ clusterAgents { id name projectPath
      configStatus { commitId error updatedAt } manifestProjects { projectId error updatedAt } } }`);
    const rows = [];
    for (const a of data.clusterAgents) {
      if (a.configStatus && a.configStatus.error) {
        const loc = location_of(a.configStatus.error);
        rows.push(h('tr', { 'data-testid': 'error-row', 'data-kind': 'config' },
          h('td', {}, h('a', { href: '#/agent/' + numericId(a.id) }, a.name)),
          h('td', {}, 'configuration'),
          h('td', { 'data-testid': 'error-file' }, h('code', {}, loc.file || '—')),
          h('td', { 'data-testid': 'error-line' }, loc.line || '—'),
          h('td', { class: 'message' }, loc.message),
          h('td', {}, h('code', {}, short(a.configStatus.commitId)), ' ', when(a.configStatus.updatedAt))));
      }
      for (const p of a.manifestProjects) {
        if (!p.error) continue;
        const loc = location_of(p.error);
        rows.push(h('tr', { 'data-testid': 'error-row', 'data-kind': 'manifests' },
          h('td', {}, h('a', { href: '#/agent/' + numericId(a.id) }, a.name)),
          h('td', {}, 'manifests of ', p.projectId),
          h('td', {}, h('code', {}, loc.file || '—')),
          h('td', {}, loc.line || '—'),
          h('td', { class: 'message' }, loc.message),
          h('td', {}, when(p.updatedAt))));
      }
    }
    return [h('h1', {}, 'Configuration errors'),
      table('errors', ['Agent', 'Where', 'File', 'Line', 'Error', 'Commit, read at'], rows,
        'No errors: every agent configuration and manifest project kas read is valid.')];
  },

  async tokens() {
    const data = await gql(`{ clusterAgents { id name projectPath
      tokens { id name description createdAt revoked revokedAt } } }`);
    const rows = [];
    for (const a of data.clusterAgents) {
      for (const t of a.tokens) {
        rows.push(h('tr', { 'data-testid': 'token-row', 'data-token': t.name },
          h('td', {}, h('a', { href: '#/agent/' + numericId(a.id) }, a.name)),
          h('td', {}, t.name), h('td', {}, t.description),
          h('td', {}, when(t.createdAt)),
          h('td', { 'data-testid': 'token-state' }, t.revoked ? [badge('revoked', 'failed'), ' ', when(t.revokedAt)] : badge('active', 'current')),
          h('td', {}, t.revoked ? '' : actionButton('Revoke', 'revoke-token', () => revokeToken(t, a)))));
      }
    }
    return [h('h1', {}, 'Agent tokens'),
      h('p', { class: 'note' }, 'Secrets are shown once when a token is created and never stored: only their names are here.'),
      table('tokens', ['Agent', 'Name', 'Description', 'Created', 'State', ''], rows, 'No tokens.')];
  },

  async 'ci-tokens'() {
    const data = await gql(`{ ciTokens { id project environment description createdAt expiresAt expired revoked revokedAt } }`);
    const rows = data.ciTokens.map((t) => h('tr', { 'data-testid': 'ci-token-row' },
      h('td', {}, t.project), h('td', {}, t.environment || 'any'), h('td', {}, t.description || ''),
      h('td', {}, when(t.createdAt)), h('td', {}, when(t.expiresAt)),
      h('td', {}, t.revoked ? badge('revoked', 'failed') : t.expired ? badge('expired', 'failed') : badge('active', 'current')),
      h('td', {}, t.revoked || t.expired ? '' : actionButton('Revoke', 'revoke-ci-token', () => revokeCiToken(t)))));
    return [h('h1', {}, 'CI tokens of the Kubernetes API proxy'),
      table('ci-tokens', ['Project', 'Environment', 'Description', 'Created', 'Expires', 'State', ''], rows,
        'No CI tokens (kas ci-token create).')];
  },

  async audit() {
    const data = await gql(`{ clusterAgents { id name proxyAudit(last: 100) { at caller project environment
      username verb resource subresource namespace name statusCode durationMs } } }`);
    const entries = [];
    for (const a of data.clusterAgents) for (const e of a.proxyAudit) entries.push([a, e]);
    entries.sort((x, y) => (x[1].at < y[1].at ? 1 : -1));
    const rows = entries.map(([a, e]) => h('tr', { 'data-testid': 'audit-row' },
      h('td', {}, when(e.at)),
      h('td', {}, h('a', { href: '#/agent/' + numericId(a.id) }, a.name)),
      h('td', {}, e.caller === 'CI_JOB' ? `CI job of ${e.project}${e.environment ? ' (' + e.environment + ')' : ''}` : `user ${e.username}`),
      h('td', {}, e.verb.toLowerCase()),
      h('td', {}, [e.resource || '(non-resource)', e.subresource ? '/' + e.subresource : ''].join('')),
      h('td', {}, [e.namespace, e.name].filter(Boolean).join('/') || '—'),
      h('td', {}, badge(String(e.statusCode), e.statusCode < 400 ? 'current' : 'failed')),
      h('td', { class: 'num' }, e.durationMs + ' ms')));
    return [h('h1', {}, 'Kubernetes API proxy audit'),
      h('p', { class: 'note' }, 'The last 100 requests per agent, newest first.'),
      table('audit', ['At', 'Agent', 'Caller', 'Verb', 'Resource', 'Object', 'Status', 'Duration'], rows,
        'No request has gone through the proxy yet.')];
  },

  async query() {
    const doc = h('textarea', { id: 'query-doc', rows: 12, spellcheck: 'false', 'data-testid': 'query-doc' },
      '{\n  clusterAgents {\n    name\n    connected\n  }\n}\n');
    const out = h('pre', { id: 'query-result', 'data-testid': 'query-result' });
    const run = async () => {
      out.textContent = '…';
      const response = await fetch('/api/graphql', {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: 'Bearer ' + session.token },
        body: JSON.stringify({ query: doc.value }),
      });
      out.textContent = `HTTP ${response.status}\n` + JSON.stringify(await response.json().catch(() => null), null, 2);
    };
    return [h('h1', {}, 'Query'),
      h('p', { class: 'note' }, session.role === 'admin'
        ? 'Runs a GraphQL document with the admin token: queries and mutations.'
        : 'Runs a GraphQL document with the viewer token: queries only.'),
      doc, h('div', { class: 'actions' }, h('button', { onclick: run, 'data-testid': 'query-run' }, 'Run')), out];
  },
};

/// `file:line:column: message` (how kas names a place in a configuration file), split for the table.
function location_of(error) {
  const m = /^(\S+?):(\d+)(?::(\d+))?: ([\s\S]*)$/.exec(error);
  if (!m) return { message: error };
  return { file: m[1], line: m[3] ? `${m[2]}:${m[3]}` : m[2], message: m[4] };
}

function configError(error) {
  const loc = location_of(error);
  return h('div', { class: 'error', 'data-testid': 'config-error' },
    h('strong', {}, 'Invalid configuration'),
    loc.file ? [' in ', h('code', {}, `${loc.file}:${loc.line}`)] : '', ': ', loc.message,
    h('div', { class: 'note' }, 'The agent keeps its last valid configuration until this is fixed.'));
}

function projectCard(agent, p) {
  const s = p.lastSync;
  const objects = s ? s.objects.map((o) => h('tr', { 'data-testid': 'object-row', 'data-key': o.resourceKey },
    h('td', {}, h('code', {}, o.resourceKey)),
    h('td', {}, o.source),
    h('td', { 'data-testid': 'object-result' }, badge(o.result)),
    h('td', { 'data-testid': 'object-health' }, o.health ? badge(o.health) : '—'),
    h('td', { class: 'message' }, o.message))) : [];
  return h('section', { class: 'card', 'data-testid': 'project', 'data-project': p.projectId },
    h('h3', {}, p.projectId, ' ', reconcileButton(agent, p.projectId, 'Reconcile now')),
    h('dl', { class: 'facts' },
      h('dt', {}, 'Newest commit'), h('dd', {}, h('code', {}, short(p.commitSeen))),
      h('dt', {}, 'Sent to the agent'), h('dd', {}, h('code', {}, short(p.commitSent))),
      h('dt', {}, 'Last sync'), h('dd', { 'data-testid': 'sync-commit' }, s ? h('code', {}, short(s.commitApplied)) : 'none reported yet'),
      h('dt', {}, 'Outcome'), h('dd', { 'data-testid': 'sync-outcome' }, s ? badge(s.outcome) : '—'),
      h('dt', {}, 'Finished'), h('dd', {}, s ? when(s.finishedAt) : '—'),
      s && s.message ? [h('dt', {}, 'Message'), h('dd', {}, s.message)] : ''),
    p.error ? h('p', { class: 'error' }, p.error) : '',
    s ? table('objects', ['Object', 'File', 'Result', 'Health', 'Message'], objects, 'The sync had no objects.') : '');
}

// --- actions (admin only: the server refuses mutations from the viewer token whatever the page does) ---

function actionButton(label, testid, action) {
  if (session.role !== 'admin') {
    return h('button', { disabled: true, title: 'Needs the admin token', 'data-testid': testid }, label);
  }
  return h('button', { 'data-testid': testid, onclick: async (ev) => {
    const button = ev.currentTarget;
    button.disabled = true;
    try {
      await action();
    } catch (e) {
      flash('error', e.message);
    } finally {
      button.disabled = false;
    }
  } }, label);
}

function reconcileButton(agent, projectPath, label) {
  if (session.role === 'admin' && session.reconcile === false) {
    return h('span', { class: 'note', 'data-testid': 'reconcile-unavailable' },
      `Reconcile now is not available: this kas does not have the ${RECONCILE} mutation yet.`);
  }
  return actionButton(label, 'reconcile', async () => {
    const data = await gql(`mutation($id: ID!, $project: String) {
      ${RECONCILE}(input: { clusterAgentId: $id, projectPath: $project }) { errors } }`,
    { id: agent.id, project: projectPath });
    const errors = data[RECONCILE].errors;
    if (errors.length) throw new Error(errors.join('; '));
    flash('ok', `Reconcile requested for ${projectPath || 'every manifest project of ' + agent.name}.`);
  });
}

async function revokeToken(t, agent) {
  if (!confirm(`Revoke token "${t.name}" of agent ${agent.name}? Its connections close at once.`)) return;
  const data = await gql('mutation($id: ID!) { clusterAgentTokenRevoke(input: { id: $id }) { errors } }', { id: t.id });
  if (data.clusterAgentTokenRevoke.errors.length) throw new Error(data.clusterAgentTokenRevoke.errors.join('; '));
  flash('ok', `Token "${t.name}" revoked.`);
  await render();
}

async function revokeCiToken(t) {
  if (!confirm(`Revoke the CI token of ${t.project}? Requests made with it end at once.`)) return;
  const data = await gql('mutation($id: ID!) { ciTokenRevoke(input: { id: $id }) { errors } }', { id: t.id });
  if (data.ciTokenRevoke.errors.length) throw new Error(data.ciTokenRevoke.errors.join('; '));
  flash('ok', 'CI token revoked.');
  await render();
}

function flash(kind, text) {
  const el = document.getElementById('flash');
  if (!el) return;
  el.className = 'flash ' + kind;
  el.textContent = text;
}

// --- routing and rendering ---

function route() {
  const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean);
  if (parts[0] === 'agent' && parts[1]) return { page: 'agent', arg: parts[1] };
  return { page: pages[parts[0]] ? parts[0] : 'agents', arg: null };
}

/// Whether a change of `topics` touches what `r` shows.
function touches(r, topics) {
  return topics.some((t) => {
    if (t === '*') return true;
    switch (r.page) {
      case 'agents': return t === 'agents' || /\/(connection|config)$/.test(t);
      case 'agent': return t.startsWith(`agent/${r.arg}/`) || t === 'agents';
      case 'errors': return t === 'agents' || /\/(config|manifests)$/.test(t);
      case 'tokens': return t === 'agents' || t.endsWith('/tokens');
      case 'ci-tokens': return t === 'ci-tokens';
      case 'audit': return t === 'agents' || t.endsWith('/audit');
      default: return false;
    }
  });
}

let rendering = null;
let renderAgain = false;

/// Renders the current page; a render asked for while one runs happens once after it.
async function render() {
  if (rendering) {
    renderAgain = true;
    return rendering;
  }
  rendering = (async () => {
    do {
      renderAgain = false;
      await renderOnce();
    } while (renderAgain);
  })();
  try {
    await rendering;
  } finally {
    rendering = null;
  }
}

async function renderOnce() {
  const main = document.getElementById('main');
  if (!session.role) return;
  const r = route();
  for (const a of document.querySelectorAll('#nav a')) {
    a.classList.toggle('active', a.dataset.page === r.page || (r.page === 'agent' && a.dataset.page === 'agents'));
  }
  if (r.page === 'query' && main.dataset.page === 'query') return; // keep what the user typed
  let content;
  try {
    content = await pages[r.page](r.arg);
  } catch (e) {
    if (e.status === 401) return logout('The token is no longer accepted.');
    content = [h('p', { class: 'error', 'data-testid': 'page-error' }, e.message)];
  }
  const flashEl = document.getElementById('flash') || h('div', { id: 'flash', 'data-testid': 'flash' });
  main.replaceChildren(flashEl, ...content.flat().filter(Boolean));
  main.dataset.page = r.page;
  main.dataset.rendered = String(Date.now());
  session.lastUpdate = new Date();
  showSession();
}

function showSession() {
  const el = document.getElementById('session');
  if (!session.role) {
    el.replaceChildren();
    return;
  }
  el.replaceChildren(
    h('span', { class: 'live ' + session.live, 'data-testid': 'live', title: 'Live updates from kas' },
      session.live === 'live' ? '● live' : session.live === 'reconnecting' ? '○ reconnecting…' : '○ connecting…'),
    session.lastUpdate ? h('span', { class: 'note' }, ' updated ', session.lastUpdate.toLocaleTimeString(), ' ') : '',
    h('span', { class: 'badge role', 'data-testid': 'role' },
      session.role === 'admin' ? 'admin' : 'viewer (read-only)'),
    h('span', { class: 'note' }, ' kas ' + session.kasVersion + ' '),
    h('button', { onclick: () => logout(), 'data-testid': 'logout' }, 'Log out'));
}

// --- live updates: the event stream, read with fetch so the token travels in a header, not the URL ---

async function listen() {
  let delay = 500;
  while (session.role) {
    const controller = new AbortController();
    session.stream = controller;
    try {
      const response = await fetch('/dashboard/api/events', {
        headers: { authorization: 'Bearer ' + session.token, accept: 'text/event-stream' },
        signal: controller.signal,
        cache: 'no-store',
      });
      if (response.status === 401) return logout('The token is no longer accepted.');
      if (!response.ok) throw new Error('HTTP ' + response.status);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          handleEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
        delay = 500;
      }
    } catch (e) {
      if (controller.signal.aborted) return;
    }
    if (!session.role) return;
    session.live = 'reconnecting';
    showSession();
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

function handleEvent(block) {
  let event = 'message';
  let data = '';
  for (const line of block.split('\n')) {
    if (line.startsWith('event:')) event = line.slice(6).trim();
    else if (line.startsWith('data:')) data += line.slice(5).trim();
  }
  if (event === 'ready') {
    // Anything that changed between the page's last query and the stream opening: query again.
    session.live = 'live';
    render();
  } else if (event === 'changed') {
    const { topics } = JSON.parse(data);
    window.dispatchEvent(new CustomEvent('kas-changed', { detail: topics }));
    if (touches(route(), topics)) render();
  }
}

// --- login ---

async function login(token) {
  const response = await fetch('/dashboard/api/session', { headers: { authorization: 'Bearer ' + token } });
  if (response.status === 401) throw new Error('This token is neither the viewer token nor the admin token of this kas.');
  if (!response.ok) throw new Error('kas answered HTTP ' + response.status);
  const body = await response.json();
  session.token = token;
  session.role = body.role;
  session.kasVersion = body.kasVersion;
  sessionStorage.setItem(TOKEN_KEY, token);
  session.reconcile = null;
  if (session.role === 'admin') {
    const schema = await gql('{ __schema { mutationType { fields { name } } } }');
    const fields = (schema.__schema.mutationType || { fields: [] }).fields.map((f) => f.name);
    session.reconcile = fields.includes(RECONCILE);
  }
  document.getElementById('nav').hidden = false;
  session.live = 'connecting';
  showSession();
  listen();
  await render();
}

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (session.stream) session.stream.abort();
  Object.assign(session, { token: null, role: null, reconcile: null, live: 'off', stream: null, lastUpdate: null });
  document.getElementById('nav').hidden = true;
  showSession();
  showLogin(message);
}

function showLogin(message) {
  const input = h('input', { type: 'password', id: 'token', name: 'token', autocomplete: 'off',
    placeholder: 'viewer or admin token', 'data-testid': 'token', required: true });
  const error = h('p', { class: 'error', 'data-testid': 'login-error' }, message || '');
  const form = h('form', { class: 'login', 'data-testid': 'login', onsubmit: async (ev) => {
    ev.preventDefault();
    error.textContent = '';
    try {
      await login(input.value.trim());
    } catch (e) {
      error.textContent = e.message;
    }
  } },
  h('h1', {}, 'kas dashboard'),
  h('label', { for: 'token' }, 'Token'), input,
  h('p', { class: 'note' }, 'The viewer token (viewer_token_file) shows everything read-only; the admin token (admin_token_file) can also revoke tokens and reconcile.'),
  h('button', { type: 'submit', 'data-testid': 'login-submit' }, 'Log in'), error);
  const main = document.getElementById('main');
  main.dataset.page = 'login';
  main.replaceChildren(form);
  input.focus();
}

window.addEventListener('hashchange', () => render());
window.addEventListener('DOMContentLoaded', async () => {
  if (session.token) {
    try {
      await login(session.token);
      return;
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      session.token = null;
    }
  }
  showLogin();
});

// Drives kas's dashboard in headless Chromium with playwright-core, for e2e/tests/dashboard.rs, which starts
// kas, agentk, Gitea and the apiserver and does the Git pushes this script asks for.
//
// Protocol: this script writes `@@<step>` lines on stdout when it needs the test to act (`push`,
// `break-config`) and reads one `@@done <commit>` line back; everything else it prints goes to stderr. It
// exits non-zero with a message on the first check that fails.
//
// Environment: KAS_URL, VIEWER_TOKEN, ADMIN_TOKEN, AGENT_NAME, PROJECT, CHROMIUM, PLAYWRIGHT_CORE (the
// package's directory), SCREENSHOT_DIR.
import { createRequire } from 'node:module';
import { createInterface } from 'node:readline';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const KAS = env('KAS_URL');
const AGENT = env('AGENT_NAME');
const PROJECT = env('PROJECT');
const SHOTS = env('SCREENSHOT_DIR');
const { chromium } = createRequire(import.meta.url)(env('PLAYWRIGHT_CORE'));

const log = (...args) => console.error('[dashboard.mjs]', ...args);
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/// Asks the Rust test to do `step`; resolves with what it answered after `@@done`.
async function ask(step) {
  process.stdout.write(`@@${step}\n`);
  const { value, done } = await lines.next();
  if (done || !value.startsWith('@@done')) throw new Error(`the test did not do ${step}: ${value}`);
  return value.slice('@@done'.length).trim();
}

function check(condition, message) {
  if (!condition) throw new Error('check failed: ' + message);
}

mkdirSync(SHOTS, { recursive: true });
const shot = async (page, name) => {
  await page.screenshot({ path: join(SHOTS, name + '.png'), fullPage: true });
  log('screenshot', name + '.png');
};

const browser = await chromium.launch({
  executablePath: env('CHROMIUM'),
  // The flags this machine's closed network needs (see the machine notes): no background connections.
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
});
const timings = {};
try {
  const context = await browser.newContext({ viewport: { width: 1360, height: 860 } });
  const page = await context.newPage();
  const origin = new URL(KAS).origin;
  const external = [];
  const consoleErrors = [];
  page.on('request', (r) => {
    const url = r.url();
    if (!url.startsWith('data:') && new URL(url).origin !== origin) external.push(url);
  });
  // The 401 and 403 answers this script provokes on purpose are logged by Chromium as resource errors.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) consoleErrors.push(m.text());
  });
  page.on('pageerror', (e) => consoleErrors.push(String(e)));
  page.on('dialog', (d) => d.accept());

  // Login: `/` leads to the dashboard; a wrong token is refused; the viewer token is a viewer.
  await page.goto(KAS + '/');
  check(new URL(page.url()).pathname === '/dashboard', `/ went to ${page.url()}`);
  await page.getByTestId('token').fill('not-a-token');
  await page.getByTestId('login-submit').click();
  await page.getByTestId('login-error').filter({ hasText: 'neither the viewer token nor the admin token' }).waitFor();
  await shot(page, 'login');
  await page.getByTestId('token').fill(env('VIEWER_TOKEN'));
  await page.getByTestId('login-submit').click();
  await page.getByTestId('role').filter({ hasText: 'viewer' }).waitFor();
  await page.getByTestId('live').filter({ hasText: 'live' }).waitFor();

  // Agents: connected, with agentk's version.
  const agentRow = page.locator(`[data-testid=agent-row][data-agent="${AGENT}"]`);
  await agentRow.getByTestId('agent-status').filter({ hasText: 'connected' }).waitFor();
  const version = (await agentRow.getByTestId('agent-version').textContent()).trim();
  check(/^\d+\.\d+\.\d+/.test(version), `agent version ${version}`);
  await shot(page, 'agents');

  // The agent: its manifest project synced, every object with its result and health.
  await agentRow.getByRole('link', { name: AGENT }).click();
  const project = page.locator(`[data-testid=project][data-project="${PROJECT}"]`);
  await project.getByTestId('sync-outcome').filter({ hasText: 'synced' }).waitFor();
  await project.locator('[data-testid=object-row][data-key*="dashboard-one"]').getByTestId('object-health')
    .filter({ hasText: 'Current' }).waitFor();
  const before = (await project.getByTestId('sync-commit').textContent()).trim();
  await shot(page, 'agent');

  // A push to Gitea changes the page without a reload.
  await page.evaluate(() => { window.__sameDocument = true; });
  const commit = await ask('push');
  const pushed = Date.now();
  await project.getByTestId('sync-commit').filter({ hasText: commit.slice(0, 12) }).waitFor({ timeout: 60000 });
  timings.pushToCommitShownMs = Date.now() - pushed;
  await project.locator('[data-testid=object-row][data-key*="dashboard-two"]').waitFor({ timeout: 60000 });
  timings.pushToNewObjectShownMs = Date.now() - pushed;
  check(await page.evaluate(() => window.__sameDocument === true), 'the page was reloaded');
  check(before !== commit.slice(0, 12), 'the commit did not change');
  log(`push ${commit.slice(0, 12)} shown after ${timings.pushToCommitShownMs} ms, new object after ${timings.pushToNewObjectShownMs} ms`);
  await project.locator('[data-testid=object-row][data-key*="dashboard-two"]').getByTestId('object-health')
    .filter({ hasText: 'Current' }).waitFor({ timeout: 60000 });
  await shot(page, 'agent-after-push');

  // Configuration errors, with file and line, as they happen.
  await page.getByRole('link', { name: 'Configuration errors', exact: true }).click();
  await page.getByTestId('errors-empty').waitFor();
  await ask('break-config');
  const broken = Date.now();
  const errorRow = page.locator('[data-testid=error-row][data-kind=config]');
  await errorRow.waitFor({ timeout: 60000 });
  timings.pushToConfigErrorShownMs = Date.now() - broken;
  const file = (await errorRow.getByTestId('error-file').textContent()).trim();
  const line = (await errorRow.getByTestId('error-line').textContent()).trim();
  check(file.endsWith(`.gitlab/agents/${AGENT}/config.yaml`), `error file ${file}`);
  check(/^\d+(:\d+)?$/.test(line), `error line ${line}`);
  check(await page.evaluate(() => window.__sameDocument === true), 'the page was reloaded');
  await shot(page, 'errors');

  // Proxy audit and CI tokens (the test made a request through the proxy with a CI token).
  await page.getByRole('link', { name: 'Proxy audit', exact: true }).click();
  await page.getByTestId('audit-row').first().waitFor();
  await shot(page, 'audit');
  await page.getByRole('link', { name: 'CI tokens', exact: true }).click();
  await page.getByTestId('ci-token-row').first().waitFor();
  check(await page.getByTestId('revoke-ci-token').first().isDisabled(), 'a viewer may revoke a CI token');
  await shot(page, 'ci-tokens');

  // Tokens: the viewer cannot revoke, neither with the page nor by calling the API itself.
  await page.getByRole('link', { name: 'Tokens', exact: true }).click();
  const tokenRow = page.getByTestId('token-row').first();
  await tokenRow.waitFor();
  check(await tokenRow.getByTestId('revoke-token').isDisabled(), 'the viewer has an enabled Revoke button');
  const tokenId = await page.evaluate(async () => {
    const token = sessionStorage.getItem('kas-dashboard-token');
    const query = async (q) => (await fetch('/api/graphql', { method: 'POST',
      headers: { 'content-type': 'application/json', authorization: 'Bearer ' + token },
      body: JSON.stringify({ query: q }) }));
    const list = await (await query('{ clusterAgents { tokens { id } } }')).json();
    const id = list.data.clusterAgents[0].tokens[0].id;
    const refused = await query(`mutation { clusterAgentTokenRevoke(input: { id: "${id}" }) { errors } }`);
    return { id, status: refused.status, body: await refused.json() };
  });
  check(tokenId.status === 403, `a viewer's revoke answered ${tokenId.status}: ${JSON.stringify(tokenId.body)}`);
  check(JSON.stringify(tokenId.body).includes('viewer token may only read'), JSON.stringify(tokenId.body));
  await tokenRow.getByTestId('token-state').filter({ hasText: 'active' }).waitFor();
  await shot(page, 'tokens');

  // The query page, with the viewer token.
  await page.getByRole('link', { name: 'Query', exact: true }).click();
  await page.getByTestId('query-run').click();
  await page.getByTestId('query-result').filter({ hasText: AGENT }).waitFor();
  await shot(page, 'query');

  // The admin: reconcile (or the notice that this kas lacks it), then revoke the agent's token.
  await page.getByTestId('logout').click();
  await page.getByTestId('token').fill(env('ADMIN_TOKEN'));
  await page.getByTestId('login-submit').click();
  await page.getByTestId('role').filter({ hasText: 'admin' }).waitFor();
  await page.goto(KAS + '/dashboard#/agents');
  await page.locator(`[data-testid=agent-row][data-agent="${AGENT}"]`).getByRole('link', { name: AGENT }).click();
  await project.waitFor();
  const hasReconcile = await page.evaluate(async () => {
    const token = sessionStorage.getItem('kas-dashboard-token');
    const r = await fetch('/api/graphql', { method: 'POST',
      headers: { 'content-type': 'application/json', authorization: 'Bearer ' + token },
      body: JSON.stringify({ query: '{ __schema { mutationType { fields { name } } } }' }) });
    return (await r.json()).data.__schema.mutationType.fields.some((f) => f.name === 'clusterAgentReconcile');
  });
  if (hasReconcile) {
    await project.getByTestId('reconcile').click();
    await page.getByTestId('flash').filter({ hasText: 'Reconcile requested' }).waitFor();
  } else {
    await page.getByTestId('reconcile-unavailable').first()
      .filter({ hasText: 'does not have the clusterAgentReconcile mutation' }).waitFor();
  }
  timings.reconcileAvailable = hasReconcile;
  await shot(page, 'agent-admin');

  await page.getByRole('link', { name: 'Tokens', exact: true }).click();
  const adminRow = page.getByTestId('token-row').first();
  check(await adminRow.getByTestId('revoke-token').isEnabled(), 'the admin has no enabled Revoke button');
  await shot(page, 'tokens-admin');
  await adminRow.getByTestId('revoke-token').click();
  await adminRow.getByTestId('token-state').filter({ hasText: 'revoked' }).waitFor();
  await shot(page, 'tokens-revoked');
  // The agent's connection closes at once; the agents page shows it without a reload.
  await page.evaluate(() => { window.__sameDocument = true; });
  const revoked = Date.now();
  await page.getByRole('link', { name: 'Agents', exact: true }).click();
  await page.locator(`[data-testid=agent-row][data-agent="${AGENT}"]`).getByTestId('agent-status')
    .filter({ hasText: 'disconnected' }).waitFor({ timeout: 30000 });
  timings.revokeToDisconnectedShownMs = Date.now() - revoked;
  check(await page.evaluate(() => window.__sameDocument === true), 'the page was reloaded');

  check(external.length === 0, `the page requested other origins: ${external.join(', ')}`);
  check(consoleErrors.length === 0, `the browser console had errors: ${consoleErrors.join(' | ')}`);
  process.stdout.write('@@result ' + JSON.stringify(timings) + '\n');
} finally {
  await browser.close();
}
process.exit(0);

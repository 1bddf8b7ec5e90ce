// A real OpenID Connect provider (panva's certified `oidc-provider`) for the
// end-to-end tests of the authenticating proxy. Plain HTTP on loopback only.
//
//   PORT            listen port on 127.0.0.1 (default 5556; 0 = any free port,
//                   the issuer then uses the port actually bound)
//   OIDC_CONFIG     JSON file with { clients: [...], users: [...] }
//                   (default: example-config.json beside this file)
//   ACCESS_TOKEN_TTL, ID_TOKEN_TTL   seconds, default 300 each
//   REFRESH_TOKEN_TTL                seconds, default 86400
//   SESSION_TTL                      seconds, default 86400 (the OP's own SSO session)
//   ROTATE_REFRESH_TOKEN             1 (default): every refresh returns a new refresh
//                                    token and the used one stops working; 0: keep it
//
// Once listening it prints exactly one line on stdout:  ready http://127.0.0.1:<port>
// Everything else (errors, events) goes to stderr.
//
// See README.md for the config format and the pages a browser-driving test uses.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

import Provider from 'oidc-provider';

const here = path.dirname(fileURLToPath(import.meta.url));

function fail(msg) {
  process.stderr.write(`oidc: ${msg}\n`);
  process.exit(1);
}

function envSeconds(name, dflt) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return dflt;
  const n = Number(raw);
  if (!Number.isInteger(n) || n <= 0) fail(`${name} must be a positive whole number of seconds, got ${JSON.stringify(raw)}`);
  return n;
}

function envPort() {
  const raw = process.env.PORT;
  if (raw === undefined || raw === '') return 5556;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 0 || n > 65535) fail(`PORT must be 0..65535, got ${JSON.stringify(raw)}`);
  return n;
}

// ---------------------------------------------------------------- config

function loadConfig(file) {
  let cfg;
  try {
    cfg = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    fail(`cannot read OIDC_CONFIG ${file}: ${err.message}`);
  }
  if (!cfg || typeof cfg !== 'object') fail(`${file}: top level must be an object`);
  const { clients, users } = cfg;
  if (!Array.isArray(clients) || clients.length === 0) fail(`${file}: "clients" must be a non-empty array`);
  if (!Array.isArray(users)) fail(`${file}: "users" must be an array`);

  const outClients = clients.map((c, i) => {
    if (!c || typeof c.client_id !== 'string' || !c.client_id) fail(`${file}: clients[${i}].client_id is required`);
    if (!Array.isArray(c.redirect_uris) || c.redirect_uris.length === 0) fail(`${file}: clients[${i}].redirect_uris must be a non-empty array`);
    const method = c.token_endpoint_auth_method ?? 'client_secret_basic';
    if (!['client_secret_basic', 'client_secret_post'].includes(method)) {
      fail(`${file}: clients[${i}].token_endpoint_auth_method must be client_secret_basic or client_secret_post`);
    }
    if (typeof c.client_secret !== 'string' || !c.client_secret) fail(`${file}: clients[${i}].client_secret is required`);
    return {
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      ...c,
      token_endpoint_auth_method: method,
    };
  });

  const bySub = new Map();
  users.forEach((u, i) => {
    if (!u || typeof u.sub !== 'string' || !u.sub) fail(`${file}: users[${i}].sub is required`);
    if (typeof u.password !== 'string') fail(`${file}: users[${i}].password is required`);
    if (u.groups !== undefined && !Array.isArray(u.groups)) fail(`${file}: users[${i}].groups must be an array`);
    if (bySub.has(u.sub)) fail(`${file}: duplicate user sub ${JSON.stringify(u.sub)}`);
    bySub.set(u.sub, u);
  });

  return {
    clients: outClients,
    users: bySub,
    offlineAccessWithoutPromptConsent: cfg.offline_access_without_prompt_consent === true,
  };
}

// A login name matches a user's sub, preferred_username or email (case-sensitive).
function findUserByLogin(users, login) {
  for (const u of users.values()) {
    if (login === u.sub || login === u.preferred_username || login === u.email) return u;
  }
  return undefined;
}

// ---------------------------------------------------------------- html

function esc(value) {
  return String(value ?? '')
    .replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;').replace(/'/g, '&#39;');
}

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(title)}</title>
<style>body{font-family:sans-serif;max-width:26rem;margin:3rem auto}label,input,button{display:block;width:100%;margin:.4rem 0}#error{color:#b00}</style>
</head>
<body>
${body}
</body>
</html>`;
}

function loginPage({ uid, clientId, scope, login, error }) {
  return page('Sign-in', `<h1>Sign-in</h1>
<p>to <strong id="client-id">${esc(clientId)}</strong> (scope <code id="scope">${esc(scope)}</code>)</p>
${error ? `<p id="error" role="alert">${esc(error)}</p>` : ''}
<form id="login-form" method="post" action="/interaction/${esc(uid)}" autocomplete="off">
<label for="login">Username or email</label>
<input id="login" name="login" type="text" value="${esc(login)}" required autofocus>
<label for="password">Password</label>
<input id="password" name="password" type="password" required>
<button id="submit" type="submit">Sign in</button>
</form>
<p><a id="cancel" href="/interaction/${esc(uid)}/abort">Cancel</a></p>`);
}

async function readForm(req, limit = 64 * 1024) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw Object.assign(new Error('request body too large'), { status: 413 });
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

// ---------------------------------------------------------------- provider

function makeProvider(issuer, cfg, ttl) {
  const { users } = cfg;

  // RSA key generated at start: every run has a fresh JWKS.
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = {
    ...privateKey.export({ format: 'jwk' }),
    kid: crypto.randomBytes(8).toString('hex'),
    alg: 'RS256',
    use: 'sig',
  };

  const configuration = {
    clients: cfg.clients,
    jwks: { keys: [jwk] },

    async findAccount(ctx, sub) {
      const u = users.get(sub);
      if (!u) return undefined;
      return {
        accountId: u.sub,
        // oidc-provider filters these by the granted scopes / claims.
        async claims() {
          const out = { sub: u.sub };
          for (const k of ['email', 'email_verified', 'name', 'preferred_username', 'groups']) {
            if (u[k] !== undefined) out[k] = u[k];
          }
          return out;
        },
      };
    },

    responseTypes: ['code'],
    scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username'],
      groups: ['groups'],
    },
    // Put the scope-requested claims into the ID token too (not only /me),
    // which is what the proxy reads.
    conformIdTokenClaims: false,

    pkce: {
      methods: ['S256'],
      required: () => true,
    },

    features: {
      devInteractions: { enabled: false },
      rpInitiatedLogout: {
        enabled: true,
        // The confirmation page submits itself (logout=yes): an RP-initiated
        // logout ends the OP session without a click. Without JavaScript the
        // button with id="logout-confirm" does the same.
        async logoutSource(ctx, form) {
          const formWithYes = form.replace('</form>', '<input type="hidden" name="logout" value="yes"/></form>');
          ctx.type = 'html';
          ctx.body = page('Sign-out', `<h1>Signing out of ${esc(ctx.host)}</h1>
${formWithYes}
<button id="logout-confirm" type="submit" form="op.logoutForm">Sign out</button>
<script>document.forms['op.logoutForm'].submit()</script>`);
        },
        async postLogoutSuccessSource(ctx) {
          ctx.type = 'html';
          ctx.body = page('Signed out', '<h1 id="signed-out">Signed out</h1>');
        },
      },
      revocation: { enabled: true },
      introspection: { enabled: true },
      userinfo: { enabled: true },
    },

    issueRefreshToken(ctx, client, code) {
      return client.grantTypeAllowed('refresh_token') && code.scopes.has('offline_access');
    },
    rotateRefreshToken: ttl.rotateRefreshToken,

    ttl: {
      AccessToken: ttl.accessToken,
      IdToken: ttl.idToken,
      RefreshToken: ttl.refreshToken,
      AuthorizationCode: 60,
      Interaction: 600,
      Session: ttl.session,
      Grant: Math.max(ttl.refreshToken, ttl.session),
    },

    cookies: {
      // Cookies are per host, not per port: keep clear of the proxy's and the
      // upstream's names on 127.0.0.1.
      names: {
        session: '_op_session',
        interaction: '_op_interaction',
        resume: '_op_interaction_resume',
      },
      // Plain http: no Secure attribute (oidc-provider only sets it on https),
      // so SameSite=None would be refused by browsers; Lax is enough since the
      // browser reaches the OP by top-level navigation only.
      long: { signed: true, httpOnly: true, sameSite: 'lax' },
      short: { signed: true, httpOnly: true, sameSite: 'lax' },
      keys: [crypto.randomBytes(32).toString('hex')],
    },

    clientBasedCORS: () => false,

    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Error', `<h1>Error</h1>
<p id="error-code">${esc(out.error)}</p>
<p id="error-description">${esc(out.error_description)}</p>`);
    },
  };

  const provider = new Provider(issuer, configuration);
  provider.proxy = false;

  // Spec: offline_access is dropped unless prompt contains consent. Optionally
  // (config "offline_access_without_prompt_consent": true) add prompt=consent
  // ourselves, the way providers such as Keycloak or Dex behave. Consent is
  // automatic either way.
  if (cfg.offlineAccessWithoutPromptConsent) {
    provider.use(async (ctx, next) => {
      if (ctx.method === 'GET' && ctx.path === '/auth') {
        const q = { ...ctx.query };
        const scopes = String(q.scope ?? '').split(' ');
        const prompts = String(q.prompt ?? '').split(' ').filter(Boolean);
        if (scopes.includes('offline_access') && !prompts.includes('consent') && !prompts.includes('none')) {
          q.prompt = [...prompts, 'consent'].join(' ');
          ctx.query = q;
        }
      }
      await next();
    });
  }

  // Interactions: our own login form; consent is granted without a page.
  provider.use(async (ctx, next) => {
    const m = /^\/interaction\/([^/]+)(\/abort)?$/.exec(ctx.path);
    if (!m) return next();
    ctx.set('cache-control', 'no-store');
    const [, , abort] = m;

    let details;
    try {
      details = await provider.interactionDetails(ctx.req, ctx.res);
    } catch (err) {
      ctx.status = err.status || 400;
      ctx.type = 'html';
      ctx.body = page('Error', `<h1>Error</h1><p id="error-code">${esc(err.error || err.message)}</p>
<p id="error-description">${esc(err.error_description || 'the sign-in request expired or its cookie is missing; start again from the application')}</p>`);
      return undefined;
    }
    const { uid, prompt, params, session } = details;

    if (abort) {
      if (ctx.method !== 'GET') { ctx.status = 405; return undefined; }
      await provider.interactionFinished(ctx.req, ctx.res, {
        error: 'access_denied',
        error_description: 'End-User aborted interaction',
      }, { mergeWithLastSubmission: false });
      ctx.respond = false;
      return undefined;
    }

    if (prompt.name === 'login') {
      if (ctx.method === 'GET') {
        ctx.type = 'html';
        ctx.body = loginPage({ uid, clientId: params.client_id, scope: params.scope });
        return undefined;
      }
      if (ctx.method !== 'POST') { ctx.status = 405; return undefined; }
      const form = await readForm(ctx.req);
      const login = form.get('login') ?? '';
      const password = form.get('password') ?? '';
      const user = findUserByLogin(users, login);
      if (!user || user.password !== password) {
        process.stderr.write(`oidc: login refused for ${JSON.stringify(login)}\n`);
        ctx.status = 403;
        ctx.type = 'html';
        ctx.body = loginPage({
          uid, clientId: params.client_id, scope: params.scope, login, error: 'Invalid username or password.',
        });
        return undefined;
      }
      await provider.interactionFinished(ctx.req, ctx.res, {
        login: { accountId: user.sub },
      }, { mergeWithLastSubmission: false });
      ctx.respond = false;
      return undefined;
    }

    if (prompt.name === 'consent') {
      // Grant every requested scope and claim, never show a page.
      const { details: missing } = prompt;
      let { grantId } = details;
      const grant = grantId
        ? await provider.Grant.find(grantId)
        : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
      if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
      if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
      if (missing.missingResourceScopes) {
        for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
          grant.addResourceScope(indicator, scopes.join(' '));
        }
      }
      grantId = await grant.save();
      const consent = details.grantId ? {} : { grantId };
      await provider.interactionFinished(ctx.req, ctx.res, { consent }, { mergeWithLastSubmission: true });
      ctx.respond = false;
      return undefined;
    }

    ctx.status = 400;
    ctx.type = 'html';
    ctx.body = page('Error', `<p id="error-code">unsupported prompt ${esc(prompt.name)}</p>`);
    return undefined;
  });

  for (const ev of ['server_error', 'authorization.error', 'grant.error', 'end_session.error',
    'userinfo.error', 'introspection.error', 'revocation.error', 'jwks.error', 'discovery.error']) {
    provider.on(ev, (...args) => {
      const err = args.find((a) => a instanceof Error);
      process.stderr.write(`oidc: ${ev}: ${err ? `${err.message}${err.error_description ? ` (${err.error_description})` : ''}` : ''}\n`);
    });
  }

  return provider;
}

// ---------------------------------------------------------------- main

const configFile = path.resolve(process.env.OIDC_CONFIG || path.join(here, 'example-config.json'));
const cfg = loadConfig(configFile);
const ttl = {
  accessToken: envSeconds('ACCESS_TOKEN_TTL', 300),
  idToken: envSeconds('ID_TOKEN_TTL', 300),
  refreshToken: envSeconds('REFRESH_TOKEN_TTL', 86400),
  session: envSeconds('SESSION_TTL', 86400),
  rotateRefreshToken: process.env.ROTATE_REFRESH_TOKEN !== '0',
};

let handler = (req, res) => { res.statusCode = 503; res.end('starting\n'); };
const server = http.createServer((req, res) => handler(req, res));
server.on('error', (err) => fail(`listen: ${err.message}`));
server.listen(envPort(), '127.0.0.1', async () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  let provider;
  try {
    provider = makeProvider(issuer, cfg, ttl);
    // oidc-provider validates static clients lazily: do it now, so a bad
    // config fails at start and not at the first login.
    for (const c of cfg.clients) {
      try {
        await provider.Client.find(c.client_id);
      } catch (err) {
        throw new Error(`client ${JSON.stringify(c.client_id)}: ${err.message}${err.error_description ? ` (${err.error_description})` : ''}`);
      }
    }
  } catch (err) {
    fail(`${err.message}${err.error_description ? ` (${err.error_description})` : ''}`);
  }
  handler = provider.callback();
  process.stderr.write(`oidc: issuer ${issuer}, config ${configFile}, ${cfg.clients.length} client(s), ${cfg.users.size} user(s)\n`);
  process.stdout.write(`ready ${issuer}\n`);
});

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    server.close();
    server.closeAllConnections?.();
    process.exit(0);
  });
}

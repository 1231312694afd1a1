// A real OpenID provider (npm `oidc-provider`) for the identity tests, on 127.0.0.1.
//
//   PORT=9000 JWKS_FILE=/tmp/keys.json node tests/peers/oidc_provider.mjs
//
// - issuer http://127.0.0.1:PORT, discovery at /.well-known/openid-configuration;
// - signing keys: the private JWKS in JWKS_FILE (the first key signs new tokens);
// - client_credentials clients (client_secret_basic or _post), each with groups:
//     alice-agent / alice-secret   groups [engineering]   scopes mcp:tools mcp:admin
//     carol-agent / carol-secret   groups [contractors]   scopes mcp:tools
// - resource indicators (RFC 8707): a token request with `resource=<url>` gets an
//   RS256 JWT access token with aud=<url>, a `groups` claim and the granted scopes;
// - JWKS_MAX_AGE (seconds, optional) sets Cache-Control on /jwks;
// - POST /admin/reload re-reads JWKS_FILE and swaps in a provider with the new keys
//   (key rotation without changing the port).
import fs from 'node:fs';
import http from 'node:http';

// The npm peers live in .peers/node_modules (scripts/setup), not next to this file.
const peers = new URL('../../.peers/node_modules/', import.meta.url);
const { default: Provider } = await import(new URL('oidc-provider/lib/index.js', peers));

const port = Number(process.env.PORT);
const jwksFile = process.env.JWKS_FILE;
const maxAge = process.env.JWKS_MAX_AGE;
const tokenTTL = Number(process.env.TOKEN_TTL || 600);
if (!port || !jwksFile) {
  console.error('PORT and JWKS_FILE are required');
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}`;

const clients = [
  {
    client_id: 'alice-agent',
    client_secret: 'alice-secret',
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    scope: 'mcp:tools mcp:admin',
    groups: ['engineering'],
  },
  {
    client_id: 'carol-agent',
    client_secret: 'carol-secret',
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    scope: 'mcp:tools',
    groups: ['contractors'],
  },
];

function makeProvider() {
  const jwks = JSON.parse(fs.readFileSync(jwksFile, 'utf8'));
  const provider = new Provider(issuer, {
    clients,
    jwks,
    scopes: ['openid', 'mcp:tools', 'mcp:admin'],
    extraClientMetadata: {
      properties: ['groups'],
      validator(ctx, key, value) {
        if (key === 'groups' && !(Array.isArray(value) && value.every((g) => typeof g === 'string'))) {
          throw new Error('groups must be an array of strings');
        }
      },
    },
    extraTokenClaims(ctx, token) {
      const client = ctx.oidc.client;
      return client?.groups ? { groups: client.groups } : undefined;
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: (ctx, client, oneOf) => oneOf,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resourceIndicator, client) => ({
          scope: client.scope,
          audience: resourceIndicator,
          accessTokenTTL: tokenTTL,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
  });
  if (maxAge) {
    provider.use(async (ctx, next) => {
      await next();
      if (ctx.path === '/jwks') ctx.set('cache-control', `public, max-age=${maxAge}`);
    });
  }
  return provider;
}

let handler = makeProvider().callback();

const server = http.createServer((req, res) => {
  if (req.method === 'POST' && req.url === '/admin/reload') {
    try {
      handler = makeProvider().callback();
      res.writeHead(204).end();
    } catch (err) {
      res.writeHead(500, { 'content-type': 'text/plain' }).end(String(err));
    }
    return;
  }
  handler(req, res);
});

server.listen(port, '127.0.0.1', () => console.log(`oidc-provider ${issuer}`));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));

// A stock OAuth 2.0 client (oauth4webapi) against the broker: RFC 8414
// discovery, client_credentials with RFC 8705 tls_client_auth and an RFC
// 9449 DPoP proof, retrying once on use_dpop_nonce as the RFC says.
// Prints the token response as JSON. Driven by tests/oauth.rs.
import * as oauth from 'oauth4webapi';
import { Agent } from 'undici';
import { readFileSync } from 'node:fs';

const { ISSUER, CA, CERT, KEY, CLIENT_ID, AUDIENCE, SCOPE } = process.env;
const agent = new Agent({
  connect: { ca: readFileSync(CA), cert: readFileSync(CERT), key: readFileSync(KEY) },
});
const tlsFetch = (url, options) => fetch(url, { ...options, dispatcher: agent });

const issuer = new URL(ISSUER);
const as = await oauth.processDiscoveryResponse(
  issuer,
  await oauth.discoveryRequest(issuer, { algorithm: 'oauth2', [oauth.customFetch]: tlsFetch }),
);
const client = { client_id: CLIENT_ID };
const DPoP = oauth.DPoP(client, await oauth.generateKeyPair('ES256'));
const parameters = new URLSearchParams({ audience: AUDIENCE, scope: SCOPE });
const grant = async () =>
  oauth.processClientCredentialsResponse(
    as,
    client,
    await oauth.clientCredentialsGrantRequest(as, client, oauth.TlsClientAuth(), parameters, {
      DPoP,
      [oauth.customFetch]: tlsFetch,
    }),
  );

let result;
let nonceRetries = 0;
try {
  result = await grant();
} catch (err) {
  if (!oauth.isDPoPNonceError(err)) throw err;
  nonceRetries += 1;
  result = await grant();
}
console.log(JSON.stringify({ ...result, nonce_retries: nonceRetries }));

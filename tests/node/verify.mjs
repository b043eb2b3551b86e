// Verify jwtauth access tokens as a Node resource server would, with jose.
// Usage: node verify.mjs JWKS_URI ISSUER AUDIENCE < tokens (one per line)
// Prints one JSON line per token: {"ok": true, "payload": {...}} or {"ok": false, "code": "ERR_..."}.
import { createInterface } from "node:readline";
import { createRemoteJWKSet, jwtVerify } from "jose";

const [jwksUri, issuer, audience] = process.argv.slice(2);
const jwks = createRemoteJWKSet(new URL(jwksUri));

for await (const token of createInterface({ input: process.stdin })) {
  try {
    const { payload } = await jwtVerify(token, jwks, { issuer, audience, algorithms: ["RS256"], typ: "at+jwt" });
    console.log(JSON.stringify({ ok: true, payload }));
  } catch (error) {
    console.log(JSON.stringify({ ok: false, code: error.code ?? String(error) }));
  }
}

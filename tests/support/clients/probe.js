// node-postgres (npm `pg`): the queries the test gives (JSON on stdin: [{text, values,
// name, binary}]), each result's rows printed as JSON. Buffers as hex, dates as ISO text,
// so the output read through the gateway compares with the same run directly.
const { Client } = require('pg');

function plain(value) {
  if (Buffer.isBuffer(value)) return 'bytes:' + value.toString('hex');
  if (value instanceof Date) return 'date:' + value.toISOString();
  if (Array.isArray(value)) return value.map(plain);
  return value;
}

(async () => {
  const [host, port, user, password] = process.argv.slice(2);
  const queries = JSON.parse(require('fs').readFileSync(0, 'utf8'));
  const client = new Client({ host, port: +port, user, password, database: 'shop', ssl: false });
  await client.connect();
  const out = [];
  for (const q of queries) {
    const result = await client.query(q);
    out.push(result.rows.map(row => Object.fromEntries(Object.entries(row).map(([k, v]) => [k, plain(v)]))));
  }
  await client.end();
  console.log(JSON.stringify(out));
})().catch(e => { console.error(`ERROR ${e.code} ${e.message}`); process.exit(1); });

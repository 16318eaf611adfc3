// A node-postgres (pg) workload for the integration tests (tests/harness/node_pg.py runs it).
//
//   node workload.mjs HOST PORT DB USER PASSWORD TABLE REF TASKS ROUNDS
//
// A pg.Pool of 6 connections; TASKS concurrent tasks each run ROUNDS rounds, cycling (from the
// task's own offset) through: named statements (node-postgres sends Parse with the name once per
// connection, then only Bind), an unnamed parameterized query, a simple query, and an INSERT in an
// explicit transaction on one pooled client. Every answer is checked. Prints one JSON line,
// {"inserted": N, "errors": [...]}; exits 1 when there were errors.

import pg from "pg";

const [host, port, database, user, password, table, ref, tasks, rounds] = process.argv.slice(2);
const pool = new pg.Pool({
  host, port: Number(port), database, user, password,
  max: 6, connectionTimeoutMillis: 15000, query_timeout: 60000,
});
const errors = [];
let inserted = 0;

function expect(got, want, what) {
  if (got !== want) {
    throw new Error(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
}

async function one(query) {
  const result = await pool.query(query);
  expect(result.rows.length, 1, "rows");
  return result.rows[0].v;
}

async function round(k, i) {
  switch ((k + i) % 6) {
    case 0:
      expect(await one({ name: "add_one", text: "SELECT $1::int + 1 AS v", values: [i] }), i + 1, "add_one");
      break;
    case 1:
      expect(await one({ name: "concat", text: "SELECT $1::text || '-' || $2::text AS v", values: [`t${k}`, `${i}`] }),
        `t${k}-${i}`, "concat");
      break;
    case 2:
      expect(await one({ name: "count_le", text: `SELECT count(*)::int AS v FROM ${ref} WHERE id <= $1`, values: [i % 100] }),
        i % 100, "count_le");
      break;
    case 3:
      expect(await one({ name: "label", text: `SELECT label AS v FROM ${ref} WHERE id = $1`, values: [(i % 100) + 1] }),
        `r${(i % 100) + 1}`, "label");
      break;
    case 4:
      // Unnamed: Parse of the unnamed statement with Bind, Execute, Sync; then a simple query.
      expect(await one({ text: "SELECT $1::int * 2 AS v", values: [i] }), 2 * i, "unnamed");
      expect(await one(`SELECT ${i} AS v`), i, "simple");
      break;
    default: {
      const client = await pool.connect();
      try {
        await client.query("BEGIN");
        const res = await client.query({ name: "insert", text: `INSERT INTO ${table} (w, i) VALUES ($1, $2)`, values: [k, i] });
        expect(res.rowCount, 1, "insert");
        expect((await client.query({ name: "add_one", text: "SELECT $1::int + 1 AS v", values: [i] })).rows[0].v, i + 1, "in tx");
        await client.query("COMMIT");
        inserted += 1;
        client.release();
      } catch (err) {
        client.release(err); // a broken or confused connection is not reused
        throw err;
      }
    }
  }
}

async function task(k) {
  for (let i = 0; i < Number(rounds); i++) {
    try {
      await round(k, i);
    } catch (err) {
      errors.push(`task ${k} round ${i}: ${err.code ?? ""} ${err.message}`);
    }
  }
}

await Promise.all(Array.from({ length: Number(tasks) }, (_, k) => task(k)));
await pool.end();
console.log(JSON.stringify({ inserted, errors }));
process.exit(errors.length === 0 ? 0 : 1);

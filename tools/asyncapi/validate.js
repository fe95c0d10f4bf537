// Validates AsyncAPI documents with the official parser (@asyncapi/parser, with the Avro
// schema parser for the avro/binary messages' schemas).
//   node tools/asyncapi/validate.js docs/asyncapi.yaml
// Prints every diagnostic; exits 1 when the document has an error or a warning, 2 on bad usage.
'use strict';

const { Parser, fromFile } = require('@asyncapi/parser');
const { AvroSchemaParser } = require('@asyncapi/avro-schema-parser');

const SEVERITY = ['error', 'warning', 'info', 'hint'];

async function validate(path) {
  const parser = new Parser();
  parser.registerSchemaParser(AvroSchemaParser());
  const { document, diagnostics } = await fromFile(parser, path).parse();
  let failed = document === undefined;
  for (const d of diagnostics) {
    const where = (d.path || []).join('/');
    const line = d.range ? d.range.start.line + 1 : '?';
    console.log(`${path}:${line}: ${SEVERITY[d.severity]} ${d.code}: ${d.message} (at /${where})`);
    if (d.severity <= 1) failed = true;
  }
  if (!failed) {
    const channels = document.channels().length;
    const messages = document.allMessages().length;
    console.log(`${path}: valid AsyncAPI ${document.version()} (${channels} channels, ${messages} messages)`);
  }
  return !failed;
}

async function main(paths) {
  if (paths.length === 0) {
    console.error('usage: node validate.js FILE...');
    return 2;
  }
  let ok = true;
  for (const path of paths) {
    ok = (await validate(path)) && ok;
  }
  return ok ? 0 : 1;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error) => {
    console.error(`cannot validate: ${error && error.stack ? error.stack : error}`);
    process.exit(1);
  },
);

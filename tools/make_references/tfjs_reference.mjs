// Reference outputs from the ORIGINAL runtime: TF.js 4.22.0, pure-JS CPU backend.
//
//   node tfjs_reference.mjs JOB.json
//
// JOB.json: {"jobs": [{"model": "/abs/model.json", "output": "node/name", "input": "/abs/in.f32",
//                     "shape": [N, H, W, C], "result": "/abs/out.f32"}, ...]}
// The input file holds raw little-endian float32 NHWC values; the result file receives the raw float32 output
// tensor and RESULT.json its shape. Called by make_tfjs_references.py, which writes the fixtures.
import fs from 'node:fs';
import path from 'node:path';

import * as tf from '@tensorflow/tfjs';

function readArtifacts(modelJson) {
  const spec = JSON.parse(fs.readFileSync(modelJson, 'utf8'));
  const dir = path.dirname(modelJson);
  const weightSpecs = [];
  const buffers = [];
  for (const group of spec.weightsManifest) {
    weightSpecs.push(...group.weights);
    for (const shard of group.paths) buffers.push(fs.readFileSync(path.join(dir, shard)));
  }
  const all = Buffer.concat(buffers);
  const weightData = all.buffer.slice(all.byteOffset, all.byteOffset + all.byteLength);
  return {
    modelTopology: spec.modelTopology,
    weightSpecs,
    weightData,
    format: spec.format,
    generatedBy: spec.generatedBy,
    convertedBy: spec.convertedBy,
    signature: spec.signature,
    userDefinedMetadata: spec.userDefinedMetadata,
  };
}

function readInput(file, shape) {
  const raw = fs.readFileSync(file);
  const values = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength));
  const expected = shape.reduce((a, b) => a * b, 1);
  if (values.length !== expected) throw new Error(`${file}: ${values.length} values, shape wants ${expected}`);
  return tf.tensor(values, shape, 'float32');
}

async function runJob(job) {
  const model = await tf.loadGraphModel(tf.io.fromMemory(readArtifacts(job.model)));
  const input = readInput(job.input, job.shape);
  const out = model.execute(input, job.output);
  const data = await out.data();
  fs.writeFileSync(job.result, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  fs.writeFileSync(`${job.result}.json`, JSON.stringify({ shape: out.shape, dtype: out.dtype }));
  console.log(`${path.basename(job.model)} ${job.output}: shape ${JSON.stringify(out.shape)}`);
  tf.dispose([input, out]);
  model.dispose();
}

async function main() {
  await tf.setBackend('cpu');
  await tf.ready();
  console.log(`tfjs ${tf.version.tfjs}, backend ${tf.getBackend()}`);
  const { jobs } = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  for (const job of jobs) await runJob(job);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});

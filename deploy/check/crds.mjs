// Validate the custom resources the chart and the overlay render (which
// kubernetes-validate has no schema for) against their projects' CRD
// schemas, from the @kubernetes-models packages:
//
//   node crds.mjs FILE.yaml...
//
// Every object of a kind listed below is validated; an object of any other
// kind outside Kubernetes' own API groups is an error, so nothing rendered
// goes unchecked.
import * as yaml from "js-yaml";
import fs from "node:fs";
import { PrometheusRule, ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import { Certificate } from "@kubernetes-models/cert-manager/cert-manager.io/v1";

const models = {
  "monitoring.coreos.com/v1 ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1 PrometheusRule": PrometheusRule,
  "keda.sh/v1alpha1 ScaledObject": ScaledObject,
  "cert-manager.io/v1 Certificate": Certificate,
};
// Kubernetes' own groups: kubernetes-validate checks these.
const builtin = /^(v1|(apps|batch|policy|autoscaling|networking\.k8s\.io|rbac\.authorization\.k8s\.io)\/v\d\w*)$/;

let checked = 0;
let failed = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    if (!doc) continue;
    const key = `${doc.apiVersion} ${doc.kind}`;
    const Model = models[key];
    if (!Model) {
      if (!builtin.test(doc.apiVersion)) {
        console.error(`${file}: ${key} ${doc.metadata?.name}: no schema to check it against`);
        failed++;
      }
      continue;
    }
    try {
      new Model(doc).validate();
      checked++;
    } catch (e) {
      console.error(`${file}: ${key} ${doc.metadata?.name}: ${e.message}`);
      failed++;
    }
  }
}
console.log(`custom resources: ${checked} validated against their CRD schemas, ${failed} failed`);
process.exit(failed ? 1 : 0);

// Copies the dashboard's npm dependencies into static/vendor, where FastAPI serves them.
// The machines that run the coordinator have no internet: no CDN links, everything is served locally.
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const vendor = join(here, "static", "vendor");
mkdirSync(vendor, { recursive: true });
const files = [
  ["node_modules/chart.js/dist/chart.umd.min.js", "chart.umd.min.js"],
  ["node_modules/chart.js/LICENSE.md", "chart.js.LICENSE.md"],
];
for (const [from, to] of files) {
  copyFileSync(join(here, from), join(vendor, to));
  console.log(`static/vendor/${to}`);
}

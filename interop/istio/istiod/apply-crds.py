#!/usr/bin/env python3
"""POST every document of a multi-document YAML file of CustomResourceDefinitions to the API server
(409 = already there). The API server parses YAML bodies itself (Content-Type: application/yaml), so
this needs only the standard library: the file is split on its `---` document separators."""
import re, ssl, sys, urllib.request, urllib.error

url, ca, token, path = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
n = 0
with open(path) as f:
    docs = re.split(r"^---[ \t]*$", f.read(), flags=re.M)
for doc in docs:
    if not re.search(r"^kind:\s*CustomResourceDefinition\s*$", doc, flags=re.M):
        continue
    name = re.search(r"^  name:\s*(\S+)", doc, flags=re.M)
    req = urllib.request.Request(
        url + "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        data=doc.encode(), method="POST",
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/yaml"})
    try:
        urllib.request.urlopen(req, context=ctx).read()
    except urllib.error.HTTPError as e:
        if e.code != 409:
            sys.exit("CRD %s: HTTP %d: %s" % (name.group(1) if name else "?", e.code, e.read().decode()[:500]))
    n += 1
if n == 0:
    sys.exit("no CustomResourceDefinition found in %s" % path)
print("applied %d CRDs" % n)

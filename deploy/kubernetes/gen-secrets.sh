#!/usr/bin/env bash
# Makes the secrets that belong to one tally installation, with openssl,
# and puts them in the cluster (kubectl's current context):
#
#   Secret    tally-ca            the root CA the broker issues under
#                                 (tls.crt, tls.key): made once, never replaced
#   ConfigMap tally-trust-bundle  bundle.pem: that root, for the injector to
#                                 hand to every sidecar
#   Secret    tally-store-key     store.key: the store sealing key: made once,
#                                 never replaced (a new one cannot open the store)
#   Secret    tally-webhook-ca    the CA of the webhook's serving certificate
#   Secret    tally-injector-tls  the injector's serving certificate (1 year)
#   and the webhook configuration's caBundle, patched to tally-webhook-ca.
#
# Usage:
#   gen-secrets.sh                  everything above (run after `kubectl apply -k`)
#   gen-secrets.sh --cert-manager   only the store key and the trust bundle:
#                                   cert-manager makes tally-ca and the webhook
#                                   certificate (overlays/cert-manager)
#   gen-secrets.sh --renew-webhook  a new serving certificate from the same
#                                   webhook CA (the caBundle does not change;
#                                   the injector reloads the files)
#   gen-secrets.sh --out DIR        write the files to DIR instead (0600, no
#                                   cluster needed): to inspect them, or apply
#                                   them another way
#
# Re-running is safe: what exists is kept, and the trust bundle and caBundle
# are made again from what is stored. No key is ever printed.
set -euo pipefail

ns=tally-system
mode=cluster
renew=false
out=
while [ $# -gt 0 ]; do
  case "$1" in
    --cert-manager) mode=cert-manager ;;
    --renew-webhook) renew=true ;;
    --out) out=${2:?--out needs a directory}; mode=files; shift ;;
    --namespace) ns=${2:?--namespace needs a name}; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gen-secrets.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done

if [ "$mode" = cert-manager ] && $renew; then
  echo "gen-secrets.sh: --renew-webhook: with --cert-manager, cert-manager renews the webhook certificate" >&2
  exit 64
fi

command -v openssl >/dev/null || { echo "gen-secrets.sh: needs openssl" >&2; exit 69; }
if [ "$mode" != files ]; then
  command -v kubectl >/dev/null || { echo "gen-secrets.sh: needs kubectl" >&2; exit 69; }
fi

umask 077
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

service=tally-injector
dns="DNS:$service.$ns.svc,DNS:$service.$ns.svc.cluster.local,DNS:$service.$ns,DNS:$service"

# P-256 keys in PKCS#8, which is what the broker reads.
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

new_ca() { # key cert subject
  new_key "$1"
  openssl req -x509 -new -key "$1" -sha256 -days 3650 -subj "$3" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out "$2" 2>/dev/null
}

new_serving_cert() { # ca-key ca-cert key cert
  new_key "$3"
  openssl req -new -key "$3" -subj "/O=tally/CN=$service.$ns.svc" -out "$work/csr" 2>/dev/null
  printf '%s\n' "subjectAltName=$dns" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > "$work/ext"
  openssl x509 -req -in "$work/csr" -CA "$2" -CAkey "$1" -set_serial "0x$(openssl rand -hex 16)" \
    -days 365 -sha256 -extfile "$work/ext" -out "$4" 2>/dev/null
}

new_store_key() { # base64url, 32 random bytes, no padding
  openssl rand 32 | openssl base64 -A | tr '+/' '-_' | tr -d '=' > "$1"
}

if [ "$mode" = files ]; then
  mkdir -p "$out"
  [ -e "$out/ca.key" ] || new_ca "$out/ca.key" "$out/ca.crt" "/O=tally/CN=tally root CA"
  cp "$out/ca.crt" "$out/bundle.pem"
  [ -e "$out/store.key" ] || new_store_key "$out/store.key"
  [ -e "$out/webhook-ca.key" ] || new_ca "$out/webhook-ca.key" "$out/webhook-ca.crt" "/O=tally/CN=tally webhook CA"
  if [ ! -e "$out/tls.key" ] || $renew; then
    new_serving_cert "$out/webhook-ca.key" "$out/webhook-ca.crt" "$out/tls.key" "$out/tls.crt"
  fi
  (cd "$out" && chmod 0600 ca.crt ca.key bundle.pem store.key webhook-ca.crt webhook-ca.key tls.crt tls.key)
  echo "wrote $out: ca.crt ca.key bundle.pem store.key webhook-ca.crt webhook-ca.key tls.crt tls.key"
  exit 0
fi

kc() { kubectl -n "$ns" "$@"; }
exists() { kc get "$1" "$2" >/dev/null 2>&1; }
# From a file, never from the command line: keys stay out of `ps`. `create`
# for what is made once (a second run racing this one fails, it does not
# replace a root); server-side `apply` for what is renewed. Neither leaves
# a copy of the key in a last-applied annotation.
put_secret() { # create|apply name type key=file...
  local verb=$1 name=$2 type=$3; shift 3
  local args=()
  for kv in "$@"; do args+=("--from-file=$kv"); done
  kc create secret generic "$name" --type="$type" "${args[@]}" --dry-run=client -o yaml > "$work/secret.yaml"
  if [ "$verb" = create ]; then
    kc create -f "$work/secret.yaml" >/dev/null
  else
    kc apply --server-side --force-conflicts --field-manager=tally-gen-secrets -f "$work/secret.yaml" >/dev/null
  fi
  echo "secret/$name: written"
}
get_key() { # secret key file
  kc get secret "$1" -o "go-template={{index .data \"$2\" | base64decode}}" > "$3"
}

kubectl get namespace "$ns" >/dev/null 2>&1 || {
  echo "gen-secrets.sh: namespace $ns not found: run kubectl apply -k deploy/kubernetes first" >&2
  exit 69
}

if [ "$mode" = cluster ]; then
  if exists secret tally-ca; then
    echo "secret/tally-ca: kept (the root CA is never replaced here; see docs/KUBERNETES.md, Upgrades)"
  else
    new_ca "$work/ca.key" "$work/ca.crt" "/O=tally/CN=tally root CA"
    put_secret create tally-ca kubernetes.io/tls "tls.crt=$work/ca.crt" "tls.key=$work/ca.key"
  fi
else
  # cert-manager issues tally-ca shortly after the overlay is applied.
  kc wait --for=condition=Ready certificate/tally-ca --timeout=120s >/dev/null
fi

# The trust bundle: the root's certificate only, never its key.
get_key tally-ca tls.crt "$work/bundle.pem"
openssl x509 -in "$work/bundle.pem" -noout >/dev/null
kc create configmap tally-trust-bundle --from-file="bundle.pem=$work/bundle.pem" \
  --dry-run=client -o yaml | kc apply --server-side --field-manager=tally-gen-secrets -f - >/dev/null
echo "configmap/tally-trust-bundle: written from secret/tally-ca"

if exists secret tally-store-key; then
  echo "secret/tally-store-key: kept (a new key could not open the store)"
else
  new_store_key "$work/store.key"
  put_secret create tally-store-key Opaque "store.key=$work/store.key"
fi

if [ "$mode" = cluster ]; then
  if exists secret tally-webhook-ca; then
    get_key tally-webhook-ca tls.crt "$work/webhook-ca.crt"
    get_key tally-webhook-ca tls.key "$work/webhook-ca.key"
  else
    new_ca "$work/webhook-ca.key" "$work/webhook-ca.crt" "/O=tally/CN=tally webhook CA"
    put_secret create tally-webhook-ca kubernetes.io/tls "tls.crt=$work/webhook-ca.crt" "tls.key=$work/webhook-ca.key"
  fi
  if exists secret tally-injector-tls && ! $renew; then
    echo "secret/tally-injector-tls: kept (--renew-webhook makes a new one)"
  else
    new_serving_cert "$work/webhook-ca.key" "$work/webhook-ca.crt" "$work/tls.key" "$work/tls.crt"
    put_secret apply tally-injector-tls kubernetes.io/tls "tls.crt=$work/tls.crt" "tls.key=$work/tls.key" \
      "ca.crt=$work/webhook-ca.crt"
  fi
  bundle=$(openssl base64 -A < "$work/webhook-ca.crt")
  kubectl patch mutatingwebhookconfiguration tally-injector --type=json \
    -p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$bundle\"}]" >/dev/null
  echo "mutatingwebhookconfiguration/tally-injector: caBundle set to secret/tally-webhook-ca"
fi

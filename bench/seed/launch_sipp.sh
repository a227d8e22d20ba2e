#!/bin/bash
# The baseline's launcher: CSV, then SIPp with the original Call-ID.
# Arguments: CALL_ID TO_NUMBER HASH_ID [REASON] [FROM_NUMBER]
[ -n "$1" ] && [ -n "$2" ] && [ -n "$3" ] || exit 1
CALL_ID=$1 TO_NUMBER=$2 HASH_ID=$3 REASON=${4:-answered} FROM_NUMBER=${5:-pbx}
DIR=$(dirname "$0")
CSV=$(mktemp /tmp/invite_cancel_XXXXXX.csv)
printf 'SEQUENTIAL\n%s;%s;%s;%s;%s;\n' "$TO_NUMBER" "$FROM_NUMBER" "$FROM_NUMBER" "$HASH_ID" "$REASON" > "$CSV"
sipp "127.0.0.1:${SEED_SIP_PORT:-5080}" -sf "$DIR/invite_cancel.xml" -inf "$CSV" -m 1 -cid_str "$CALL_ID" -nostdin -i 127.0.0.1 >/dev/null 2>&1
rm -f "$CSV"
